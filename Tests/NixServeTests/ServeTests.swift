import Foundation
import NixFormats
import Testing
import TestSupport

/// A running `nixfs serve` in front of an upstream cache, stopped when released.
final class Serve: @unchecked Sendable {
  let process: BackgroundProcess
  let url: String
  let stateDir: String

  init(upstream: CacheServer, key: String, stateDir: String, extra: [String] = []) throws {
    self.stateDir = stateDir
    process = try BackgroundProcess(
      [nixfsBinary, "serve", "--listen", "127.0.0.1:0", "--state-dir", stateDir, "--substituter", upstream.url,
       "--trusted-public-key", key, "--log-level", "warning"] + extra)
    guard let line = process.readLine(), let range = line.range(of: "http://") else {
      throw CommandError(argv: process.argv, status: -1, stderr: process.stderr)
    }
    url = String(line[range.lowerBound...])
  }

  deinit { process.stop() }
}

/// One GET with Python's urllib: (status, body).
func get(_ url: String) throws -> (status: Int, body: String) {
  let script = """
    import sys, urllib.request, urllib.error
    try:
        r = urllib.request.urlopen(sys.argv[1], timeout=120); print(r.status); sys.stdout.write(r.read().decode("latin-1"))
    except urllib.error.HTTPError as e:
        print(e.code); sys.stdout.write(e.read().decode("latin-1"))
    """
  let out = try run(["python3", "-c", script, url]).text
  let nl = out.firstIndex(of: "\n") ?? out.endIndex
  return (Int(out[..<nl]) ?? -1, nl < out.endIndex ? String(out[out.index(after: nl)...]) : "")
}

@Suite(.serialized) struct ServeTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// Real Nix, signatures required, copying through the serve into an empty store.
  func nixCopy(from serve: Serve, _ path: StorePath, into root: String) throws -> CommandResult {
    try run(["nix", "copy", "--from", serve.url, "--to", root, path.path], environment: clientEnvironment(root), check: false)
  }

  /// A Nix client of its own: the project's settings, the fixture key, and a private cache
  /// directory (Nix's narinfo cache in ~/.cache is machine state, and concurrent clients sharing it
  /// fail on its SQLite constraints).
  func clientEnvironment(_ root: String) -> [String: String] {
    var env = NixFixture.environment
    env["NIX_CONFIG"] = "trusted-public-keys = \(fx.publicKey)\nrequire-sigs = true\n"
    env["XDG_CACHE_HOME"] = root + "-xdg-cache"
    return env
  }

  var closure: [StorePath] { ["app", "lib", "busybox"].map { fx.paths[$0]! } }

  @Test(arguments: ["xz", "zstd"])
  func nixCopiesAClosureThroughTheServe(compression: String) throws {
    let tmp = try TemporaryDirectory("serve-copy")
    let upstream = try CacheServer(directory: fx.caches[compression]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    let copied = try nixCopy(from: serve, fx.paths["app"]!, into: tmp.sub("root"))
    #expect(copied.status == 0, "\(copied.stderr)")
    for path in closure {
      // Byte for byte: the copied tree dumps to the upstream's signed NarHash.
      let nar = try NixFixture.dump(tmp.sub("root") + path.path)
      #expect(NixHash.sha256(nar) == (try fx.narInfo(path, compression: compression)).narHash, "\(path.name)")
    }
    let upstreamNARs = StoreFixture.narRequests(upstream).count
    #expect(upstreamNARs == closure.count)
    // A second client costs upstream nothing: every path is held.
    let again = try nixCopy(from: serve, fx.paths["app"]!, into: tmp.sub("root2"))
    #expect(again.status == 0, "\(again.stderr)")
    #expect(StoreFixture.narRequests(upstream).count == upstreamNARs)
    // The served narinfo keeps the upstream's signature and points at an uncompressed NAR.
    let info = try get("\(serve.url)/\(fx.paths["lib"]!.hashPart).narinfo")
    #expect(info.status == 200)
    let parsed = try NarInfo(parsing: info.body)
    #expect(parsed.signatures == (try fx.narInfo(fx.paths["lib"]!, compression: compression)).signatures)
    #expect(parsed.compression == .none && parsed.url.hasPrefix("nar/"))
    // What happened, as Prometheus series.
    let metrics = try get("\(serve.url)/metrics").body
    #expect(metrics.contains("# HELP nixfs_serve_paths_pulled_total"), "\(metrics)")
    #expect(metrics.contains("nixfs_serve_paths_pulled_total 3"), "\(metrics)")
    #expect(metrics.contains("nixfs_serve_uploads_total 0"), "\(metrics)")
    #expect(metrics.contains("nixfs_serve_store_bytes "), "\(metrics)")
  }

  /// Eight clients asking at once for a cold closure: one upstream download per path.
  @Test func concurrentClientsShareOneUpstreamDownload() throws {
    let tmp = try TemporaryDirectory("serve-flight")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!, latencyMs: 50)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    let clients = try (0..<8).map { i in
      try BackgroundProcess(
        ["nix", "copy", "--from", serve.url, "--to", tmp.sub("root\(i)"), fx.paths["app"]!.path],
        environment: clientEnvironment(tmp.sub("root\(i)")))
    }
    for (i, c) in clients.enumerated() {
      #expect(c.wait(seconds: 240), "client \(i) did not finish")
      #expect(c.process.terminationStatus == 0, "client \(i): \(c.stderr)")
    }
    let nars = StoreFixture.narRequests(upstream)
    #expect(nars.count == closure.count, "\(nars)")
    #expect(Set(nars).count == nars.count, "a NAR was downloaded twice: \(nars)")
  }

  /// A NAR that does not match its signed NarHash is refused: the client gets an error, nothing
  /// is stored (the next request downloads again), and the other paths are served.
  @Test func aTamperedUpstreamNARIsRefused() throws {
    let tmp = try TemporaryDirectory("serve-tamper")
    let cache = try fx.copyCache("none", to: tmp.sub("cache"))
    let lib = fx.paths["lib"]!
    let narFile = "\(cache)/\(try fx.narInfo(lib, compression: "none").url)"
    var bytes = try Array(Data(contentsOf: URL(fileURLWithPath: narFile)))
    bytes[bytes.count / 2] ^= 0xff
    try Data(bytes).write(to: URL(fileURLWithPath: narFile))
    let upstream = try CacheServer(directory: cache)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    let first = try get("\(serve.url)/\(lib.hashPart).narinfo")
    #expect(first.status == 502)
    #expect(first.body.contains("NarHash mismatch"), "\(first.body)")
    let second = try get("\(serve.url)/\(lib.hashPart).narinfo")
    #expect(second.status == 502)
    let libNAR = "/" + (try fx.narInfo(lib, compression: "none")).url
    #expect(StoreFixture.narRequests(upstream).filter { $0 == libNAR }.count >= 2, "nothing of it may be kept")
    #expect(try get("\(serve.url)/\(fx.paths["busybox"]!.hashPart).narinfo").status == 200)
    let copied = try nixCopy(from: serve, fx.paths["app"]!, into: tmp.sub("root"))
    #expect(copied.status != 0)
    #expect(!FileManager.default.fileExists(atPath: tmp.sub("root") + lib.path))
  }

  @Test func missesAndBadNames() throws {
    let tmp = try TemporaryDirectory("serve-miss")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    let info = try get("\(serve.url)/nix-cache-info")
    #expect(info.status == 200 && info.body.contains("StoreDir: /nix/store"))
    let absent = String(repeating: "0", count: 32)
    #expect(try get("\(serve.url)/\(absent).narinfo").status == 404)
    #expect(try get("\(serve.url)/\(absent).narinfo").status == 404)
    // The second miss was remembered: upstream was asked once.
    #expect(upstream.requests.filter { $0 == "/\(absent).narinfo" }.count == 1)
    for bad in ["not-a-hash.narinfo", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo", "nar/..%2f..%2fetc%2fpasswd", "nar/x.nar"] {
      let r = try get("\(serve.url)/\(bad)")
      #expect(r.status == 400 || r.status == 404, "\(bad): \(r.status)")
    }
    #expect(!upstream.requests.contains { $0.contains("etc") })
  }
}

/// `nix copy --to http://…` into the serve: only with credentials, only signed by a trusted key,
/// only a NAR that matches its narinfo; what was uploaded is then served to plain Nix.
@Suite(.serialized) struct UploadTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  struct Setup {
    let tmp: TemporaryDirectory
    let nix: NixFixture
    let path: String
    let uploadKey: String
    let strangerKeyFile: String
    let upstream: CacheServer
    let serve: Serve
  }

  /// A fresh path made by `nix-store --add` and signed by a key the serve trusts; a serve that
  /// accepts uploads from `ci:s3cret`.
  func setup(_ label: String) throws -> Setup {
    let tmp = try TemporaryDirectory(label)
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("upload-1")
    let (strangerSK, _) = try nix.generateKey("stranger-1")
    try Tree.file(tmp.sub("tree/share/pushed.txt"), "pushed by CI\n")
    try Tree.file(tmp.sub("tree/share/blob"), Tree.bytes(300_000, seed: 77))
    let path = try nix.add(tmp.sub("tree"))
    try nix.sign([path], keyFile: sk)
    try "ci:s3cret\n# a comment\nbearer t0ken\n".write(toFile: tmp.sub("creds"), atomically: true, encoding: .utf8)
    try "machine 127.0.0.1 login ci password s3cret\n".write(toFile: tmp.sub("netrc"), atomically: true, encoding: .utf8)
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(
      upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"),
      extra: ["--trusted-public-key", pk, "--upload-credentials-file", tmp.sub("creds"), "--negative-ttl", "3600"])
    return Setup(tmp: tmp, nix: nix, path: path, uploadKey: pk, strangerKeyFile: strangerSK, upstream: upstream, serve: serve)
  }

  func push(_ s: Setup, netrc: Bool = true) throws -> CommandResult {
    var env = NixFixture.environment
    env["XDG_CACHE_HOME"] = s.tmp.sub("xdg-push")
    if netrc { env["NIX_CONFIG"] = "netrc-file = \(s.tmp.sub("netrc"))\n" }
    return try run(["nix", "copy", "--store", s.nix.store, "--to", s.serve.url, s.path], environment: env, check: false)
  }

  @Test func nixCopyToTheServeThenFromIt() throws {
    let s = try setup("upload")
    // Asked before the push (and remembered as missing for an hour), then pushed: served at once.
    let base = (s.path as NSString).lastPathComponent
    let hashPart = String(base.prefix(32))
    #expect(try get("\(s.serve.url)/\(hashPart).narinfo").status == 404)
    let pushed = try push(s)
    #expect(pushed.status == 0, "\(pushed.stderr)")
    var env = NixFixture.environment
    env["NIX_CONFIG"] = "trusted-public-keys = \(s.uploadKey)\nrequire-sigs = true\n"
    env["XDG_CACHE_HOME"] = s.tmp.sub("xdg-pull")
    let pulled = try run(["nix", "copy", "--from", s.serve.url, "--to", s.tmp.sub("root2"), s.path], environment: env, check: false)
    #expect(pulled.status == 0, "\(pulled.stderr)")
    #expect(try String(contentsOfFile: s.tmp.sub("root2") + s.path + "/share/pushed.txt", encoding: .utf8) == "pushed by CI\n")
    #expect(try NixFixture.dump(s.tmp.sub("root2") + s.path) == NixFixture.dump(s.tmp.sub("tree")))
  }

  @Test func uploadsNeedCredentials() throws {
    let s = try setup("upload-auth")
    let pushed = try push(s, netrc: false)
    #expect(pushed.status != 0)
    #expect(try get("\(s.serve.url)/\(String((s.path as NSString).lastPathComponent.prefix(32))).narinfo").status == 404)
    // A serve started without --upload-credentials-file takes no uploads at all.
    let closed = try Serve(upstream: s.upstream, key: fx.publicKey, stateDir: s.tmp.sub("state-closed"))
    let r = try run(["python3", "-c", """
      import sys, urllib.request, urllib.error
      req = urllib.request.Request(sys.argv[1] + "/nar/x.nar", data=b"x", method="PUT")
      try: urllib.request.urlopen(req)
      except urllib.error.HTTPError as e: print(e.code)
      """, closed.url])
    #expect(r.trimmed == "403")
  }

  @Test func untrustedOrTamperedUploadsAreRefused() throws {
    let s = try setup("upload-bad")
    // Signed by a key the serve does not trust: refused.
    try s.nix.sign([s.path], keyFile: s.strangerKeyFile)
    let other = try TemporaryDirectory("upload-bad-cache")
    try s.nix.copy([s.path], toCache: other.sub("c"), compression: "xz")
    let hashPart = String((s.path as NSString).lastPathComponent.prefix(32))
    let narinfo = try String(contentsOfFile: other.sub("c/\(hashPart).narinfo"), encoding: .utf8)
    let info = try NarInfo(parsing: narinfo)
    let narBytes = try Data(contentsOf: URL(fileURLWithPath: other.sub("c/\(info.url)")))
    func put(_ path: String, _ data: Data) throws -> Int {
      let file = other.sub("body")
      try data.write(to: URL(fileURLWithPath: file))
      return Int(try run(["python3", "-c", """
        import sys, base64, urllib.request, urllib.error
        req = urllib.request.Request(sys.argv[1], data=open(sys.argv[2], "rb").read(), method="PUT")
        req.add_header("Authorization", "Bearer t0ken")
        try: print(urllib.request.urlopen(req).status)
        except urllib.error.HTTPError as e: print(e.code); sys.stderr.write(e.read().decode())
        """, "\(s.serve.url)/\(path)", file]).trimmed) ?? -1
    }
    // Only the stranger's signature: 403.
    let strangerOnly = narinfo.split(separator: "\n").filter { !$0.hasPrefix("Sig: upload-1:") }.joined(separator: "\n") + "\n"
    #expect(try put(info.url, narBytes) == 201)
    #expect(try put("\(hashPart).narinfo", Data(strangerOnly.utf8)) == 403)
    // A trusted signature but a NAR with one byte flipped: 400, nothing kept.
    var bad = narBytes
    bad[bad.count / 2] ^= 0xff
    #expect(try put(info.url, bad) == 201)
    #expect(try put("\(hashPart).narinfo", Data(narinfo.utf8)) == 400)
    #expect(try get("\(s.serve.url)/\(hashPart).narinfo").status == 404)
    // Names that would leave the upload directory.
    #expect(try put("nar/..%2F..%2Fetc%2Fpasswd", Data("x".utf8)) != 201)
    #expect(try put("nar/.hidden.nar", Data("x".utf8)) == 400)
    // The good pair, as a client would send it, is accepted.
    #expect(try put(info.url, narBytes) == 201)
    #expect(try put("\(hashPart).narinfo", Data(narinfo.utf8)) == 201)
    #expect(try get("\(s.serve.url)/\(hashPart).narinfo").status == 200)
  }
}

@Suite(.serialized) struct ClosureTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// One request for a whole cold closure: narinfos only (no NAR moves), each verifiable with the
  /// upstream's key; a NAR asked for afterwards is pulled through then.
  @Test func aClosureInOneRequest() throws {
    let tmp = try TemporaryDirectory("serve-closure")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    let app = fx.paths["app"]!
    let r = try get("\(serve.url)/nixfs/v1/closure/\(app.hashPart)")
    #expect(r.status == 200, "\(r.body)")
    let json = try #require(try JSONSerialization.jsonObject(with: Data(r.body.utf8)) as? [String: Any])
    #expect(json["root"] as? String == app.path)
    let narinfos = try #require(json["narinfos"] as? [String: String])
    #expect(Set(narinfos.keys) == Set(["app", "lib", "busybox"].map { fx.paths[$0]!.hashPart }))
    #expect(StoreFixture.narRequests(upstream).isEmpty, "the closure endpoint downloaded NARs")
    let keys = try TrustedKeys(parsing: [fx.publicKey])
    for (_, text) in narinfos { _ = try NarInfo(parsing: text).verify(trusting: keys) }
    let lib = try NarInfo(parsing: narinfos[fx.paths["lib"]!.hashPart]!)
    let nar = try run(["python3", "-c", "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
      "\(serve.url)/\(lib.url)"]).stdout
    #expect(NixHash.sha256(nar) == lib.narHash)
    #expect(StoreFixture.narRequests(upstream).count == 1)
    #expect(try get("\(serve.url)/nixfs/v1/closure/\(String(repeating: "0", count: 32))").status == 404)
  }
}

@Suite(.serialized) struct ListingTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  static func withoutOffsets(_ l: NarListing) -> NarListing {
    switch l {
    case .directory(let entries): .directory(entries.mapValues(withoutOffsets))
    case .regular(let size, let executable, _): .regular(size: size, executable: executable, narOffset: nil)
    case .symlink: l
    }
  }

  /// `<hash>.ls` says what Nix's own listing says (`write-nar-listing=1`), offsets aside.
  @Test func listingsMatchNix() throws {
    let tmp = try TemporaryDirectory("serve-ls")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"))
    for name in ["kinds", "app"] {
      let path = fx.paths[name]!
      // Bytes as sent (get() reads text as Latin-1, which would mangle the UTF-8 names).
      let body = try run(["python3", "-c", "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
        "\(serve.url)/\(path.hashPart).ls"]).stdout
      let ours = try NarListing(parsing: Data(body))
      let nix = try NarListing(parsing: Data(contentsOf: URL(fileURLWithPath: "\(fx.caches["zstd"]!)/\(path.hashPart).ls")))
      #expect(ours == Self.withoutOffsets(nix), "\(name)")
    }
    #expect(try get("\(serve.url)/\(String(repeating: "0", count: 32)).ls").status == 404)
  }
}

@Suite(.serialized) struct SlowClientTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// A client that connects and says nothing is hung up on after the idle timeout, and the serve
  /// answers others meanwhile.
  @Test func silentClientsAreHungUpOn() throws {
    let tmp = try TemporaryDirectory("serve-idle")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"), extra: ["--idle-timeout", "2"])
    let port = serve.url.split(separator: ":").last!
    let silent = try BackgroundProcess(["python3", "-c", """
      import socket, sys
      s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.settimeout(120)
      print("closed" if s.recv(1) == b"" else "data", flush=True)
      """, String(port)])
    #expect(try get("\(serve.url)/nix-cache-info").status == 200)
    #expect(silent.readLine() == "closed")
  }
}
