import Foundation
import NixFormats
import Testing
import TestSupport

/// `nixfs serve --build`: what no cache has is built once, by real Nix in the serve's own store,
/// its dependencies substituted from upstream; the output is then an ordinary, signed path of the
/// serve that Nix clients and nodes fetch.
@Suite(.serialized) struct BuildTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  struct Setup {
    let tmp: TemporaryDirectory
    let upstream: CacheServer
    let serve: Serve
    let serveKey: String
  }

  func setUp(_ label: String, extra: [String] = []) throws -> Setup {
    let tmp = try TemporaryDirectory(label)
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("serve-build-1")
    try "# who may ask for builds\nnode:s3cret\n".write(toFile: tmp.sub("builders.creds"), atomically: true, encoding: .utf8)
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(
      upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("serve"),
      extra: ["--secret-key-file", sk, "--build", "--build-credentials-file", tmp.sub("builders.creds"), "--build-wait", "1",
        "--log-level", "info"] + extra)
    return Setup(tmp: tmp, upstream: upstream, serve: serve, serveKey: pk)
  }

  /// POSTs a build request as a node does (HTTP basic from its netrc): (status, answer).
  func post(_ s: Setup, _ request: [String: String], credential: String? = "node:s3cret") throws -> (Int, [String: Any]) {
    let script = """
      import base64, json, sys, urllib.request, urllib.error
      req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST", headers={"Content-Type": "application/json"})
      if sys.argv[3]:
          req.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[3].encode()).decode())
      try:
          r = urllib.request.urlopen(req, timeout=60); print(r.status); print(r.read().decode())
      except urllib.error.HTTPError as e:
          print(e.code); print(e.read().decode())
      """
    let body = String(decoding: try JSONSerialization.data(withJSONObject: request), as: UTF8.self)
    let out = try run(["python3", "-c", script, "\(s.serve.url)/nixfs/v1/builds", body, credential ?? ""]).text
    let lines = out.split(separator: "\n", maxSplits: 1).map(String.init)
    let status = Int(lines.first ?? "") ?? -1
    let json = lines.count > 1 ? (try? JSONSerialization.jsonObject(with: Data(lines[1].utf8))) as? [String: Any] : nil
    return (status, json ?? [:])
  }

  /// Asks until the build is no longer running (at most `seconds`).
  func settle(_ s: Setup, _ request: [String: String], seconds: Double = 120) throws -> (Int, [String: Any]) {
    let deadline = Date().addingTimeInterval(seconds)
    var last = try post(s, request)
    while last.0 == 202 && Date() < deadline {
      usleep(300_000)
      last = try post(s, request)
    }
    return last
  }

  /// A derivation whose builder is the upstream cache's busybox, running `script`; `unique` makes
  /// its output one no cache holds.
  func expression(_ script: String, unique: String = UUID().uuidString.lowercased()) -> String {
    let bb = fx.paths["busybox"]!.path
    return """
      let bb = builtins.storePath "\(bb)"; in
      derivation { name = "built-\(unique.prefix(8).lowercased())"; system = "x86_64-linux"; builder = "${bb}/bin/busybox";
        args = ["sh" "-c" "\(script.replacingOccurrences(of: "BB", with: "${bb}/bin/busybox"))"]; }
      """
  }

  func builds(_ s: Setup, _ outcome: String) throws -> Double {
    let text = try get("\(s.serve.url)/metrics").body
    for line in text.split(separator: "\n") where line.hasPrefix("nixfs_serve_builds_total{") && line.contains("outcome=\"\(outcome)\"") {
      return Double(line.split(separator: " ").last ?? "") ?? -1
    }
    return -1
  }

  @Test func anExpressionNoCacheHasIsBuiltOnceAndServedSigned() throws {
    let s = try setUp("build-expr")
    #expect(try get("\(s.serve.url)/nix-cache-info").body.contains("NixfsBuild: nixfs/v1"))
    let unique = UUID().uuidString.lowercased()  // never "BB", the script's busybox placeholder
    let request = ["nixExpr": expression("BB sleep 2; BB echo \(unique) > $out", unique: unique), "pod": "ci-1", "namespace": "team"]
    // Longer than the request waits: the node hears "building" (kubelet retries).
    let (first, answer) = try post(s, request)
    #expect(first == 202 && answer["state"] as? String == "building", "\(first) \(answer)")
    let (status, done) = try settle(s, request)
    #expect(status == 200 && done["state"] as? String == "done", "\(status) \(done) \(s.serve.process.stderr.suffix(3000))")
    let out = try StorePath(try #require(done["storePath"] as? String))
    // An ordinary path of the serve now: its narinfo signed by the serve's key.
    let narinfo = try get("\(s.serve.url)/\(out.hashPart).narinfo")
    #expect(narinfo.status == 200 && narinfo.body.contains("Sig: serve-build-1:"), "\(narinfo)")
    // A plain Nix client, signatures required, copies it into an empty store.
    let client = NixFixture(in: s.tmp.sub("client"))
    try client.nix([
      "nix", "copy", "--store", client.store, "--from", s.serve.url, "--option", "trusted-public-keys", s.serveKey, out.path,
    ])
    #expect(try String(contentsOfFile: "\(client.store)\(out.path)", encoding: .utf8) == "\(unique)\n")
    // Asked again (another node, a retry): the same path at once, no second build.
    let (again, same) = try post(s, request)
    #expect(again == 200 && same["storePath"] as? String == out.path)
    #expect(try builds(s, "succeeded") == 1)
    let log = s.serve.process.stderr
    #expect(log.contains("build requested") && log.contains("pod=ci-1") && log.contains("namespace=team"), "the log says who asked: \(log.suffix(2000))")
  }

  @Test func aFailingBuildSaysWhyAndATimeoutIsKilled() throws {
    let s = try setUp("build-fail", extra: ["--build-timeout", "3"])
    let failing = ["nixExpr": expression("echo the builder says no >&2; exit 1")]
    let (status, answer) = try settle(s, failing)
    let message = answer["message"] as? String ?? ""
    #expect(status == 422 && message.contains("the builder says no"), "\(status) \(answer)")
    #expect(try builds(s, "failed") == 1)
    let slow = ["nixExpr": expression("BB sleep 60; BB echo late > $out")]
    let started = Date()
    let (timedOut, late) = try settle(s, slow)
    #expect(timedOut == 422 && (late["message"] as? String ?? "").contains("did not finish within 3 s"), "\(timedOut) \(late)")
    #expect(Date().timeIntervalSince(started) < 45, "the build was not killed at its deadline")
    #expect(try builds(s, "timeout") == 1)
    // The serve kept serving throughout.
    #expect(try get("\(s.serve.url)/nix-cache-info").status == 200)
  }

  @Test func requestsNeedACredentialAndOneThing() throws {
    let s = try setUp("build-auth")
    let request = ["nixExpr": expression("BB echo x > $out")]
    #expect(try post(s, request, credential: nil).0 == 401)
    #expect(try post(s, request, credential: "node:wrong").0 == 401)
    #expect(try builds(s, "refused") == 2)
    #expect(try post(s, ["nixExpr": "1", "flakeRef": "path:/x"]).0 == 400)
    #expect(try post(s, ["derivation": "/etc/passwd"]).0 == 400)
    #expect(try builds(s, "succeeded") == 0, "nothing was built")
  }
}
