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
