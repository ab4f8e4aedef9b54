import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A bad answer from one cache falls through to the next, as in Nix: a first substituter that
/// corrupts, truncates, stalls or fails what it sends, in front of a good second one, costs a pod
/// nothing but time. Nothing wrong is stored, and the fall-through is logged and counted.
@Suite(.serialized) struct FallThroughTests {
  let fx: LargePathFixture
  init() throws { fx = try LargePathFixture.shared() }

  /// A node mounting `substituters` in that order (each given its priority by position), with
  /// its metrics on a port of its own.
  func mount(
    _ tmp: TemporaryDirectory, _ substituters: [String], keys: [String], extra: [String] = []
  ) throws -> (node: MountedStore, metrics: Int) {
    let port = try freePort()
    var arguments = ["--log-level", "info", "--metrics-listen", "127.0.0.1:\(port)", "--stall-timeout", "2"]
    for (i, url) in substituters.enumerated() { arguments += ["--substituter", "\(url)?priority=\(10 * (i + 1))"] }
    arguments += keys.flatMap { ["--trusted-public-key", $0] } + extra
    return (try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("node"), arguments: arguments), port)
  }

  /// `nixfs_substituter_fallthroughs_total` of one substituter, by cause (non-zero series only).
  func fallThroughs(_ port: Int, of substituter: String) throws -> [String: Double] {
    var out: [String: Double] = [:]
    for line in try httpBody("http://127.0.0.1:\(port)/metrics").split(separator: "\n")
    where line.hasPrefix("nixfs_substituter_fallthroughs_total{") && line.contains("substituter=\"\(substituter)\"") {
      guard let cause = line.firstMatch(of: /cause="([a-z_]+)"/)?.1, let value = Double(line.split(separator: " ").last ?? "")
      else { continue }
      if value > 0 { out[String(cause)] = value }
    }
    return out
  }

  func contents(_ path: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }

  /// Every read returns the fixture's bytes, and the store checks clean through the daemon.
  func expectGoodReads(_ node: MountedStore, _ files: [String]) throws {
    for file in files {
      #expect(
        try contents(node.path("\(fx.big.baseName)/\(file)")) == (try contents("\(fx.tree)/\(file)")),
        "\(file): \(node.daemon.stderr.suffix(3000))")
    }
    let fsck = try run([nixfsBinary, "fsck", "--state-dir", node.stateDir], check: false)
    #expect(fsck.status == 0 && fsck.text.contains("consistent"), "\(fsck.text) \(fsck.stderr)")
  }

  static let reads = ["bin/tool", "etc/hello.txt", "share/doc/3.txt", "lib/a.so", "lib/b.so"]

  /// Plain caches: the first one's NARs are corrupted, cut short, answered 500 or stalled.
  @Test(arguments: ["corrupt", "truncate", "fail", "stall"])
  func aFailingFirstCacheFallsThroughToTheNext(fault: String) throws {
    let tmp = try TemporaryDirectory("fallthrough-\(fault)")
    let nars = "^/nar/"
    let bad = try CacheServer(
      directory: fx.cache, stall: fault == "stall" ? nars : nil, fail: fault == "fail" ? nars : nil,
      corrupt: fault == "corrupt" ? nars : nil, truncate: fault == "truncate" ? nars : nil)
    let good = try CacheServer(directory: fx.cache)
    let (node, port) = try mount(tmp, [bad.url, good.url], keys: [fx.publicKey])
    defer { node.stop() }
    try expectGoodReads(node, Self.reads)
    #expect(!StoreFixture.narRequests(bad).isEmpty, "the first cache was tried")
    #expect(StoreFixture.narRequests(good).count == 1, "one NAR from the second: \(good.requests)")
    let log = node.daemon.stderr
    #expect(log.contains("substituter failed; trying the next source") && log.contains(bad.url), "\(log.suffix(3000))")
    let expected: Set<String> =
      switch fault {
      case "corrupt": ["corrupt", "hash_mismatch"]
      case "truncate": ["corrupt", "size_mismatch", "hash_mismatch"]
      case "fail": ["http_status"]
      default: ["stalled"]
      }
    let counted = try fallThroughs(port, of: bad.url)
    #expect(!counted.isEmpty && Set(counted.keys).isSubset(of: expected), "\(counted)")
    #expect(try fallThroughs(port, of: good.url).isEmpty)
  }

  /// A serve behind a broken proxy: every chunk index (or every chunk), and every NAR, it sends
  /// is corrupted. The path comes from the upstream cache listed after it: whole when the index is
  /// refused; when chunks are, the partial path is completed from the upstream's NAR, the bad
  /// chunks never stored.
  @Test(arguments: ["manifests", "chunks"])
  func aServeSendingBadDataFallsThroughToUpstream(what: String) throws {
    let tmp = try TemporaryDirectory("fallthrough-serve-\(what)")
    let nix = NixFixture(in: tmp.path)
    let (sk, serveKey) = try nix.generateKey("serve-1")
    let upstream = try CacheServer(directory: fx.cache)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("serve"), extra: ["--secret-key-file", sk])
    #expect(try get("\(serve.url)/\(fx.big.hashPart).narinfo").status == 200)
    // Chunks come one by one and in batches (`/nixfs/v1/chunks`): both are corrupted.
    let proxy = try CacheServer(upstream: serve.url, corrupt: "^/nixfs/v1/\(what)|^/nar/")
    let (node, port) = try mount(tmp, [proxy.url, upstream.url], keys: [fx.publicKey, serveKey])
    defer { node.stop() }
    let narsBefore = StoreFixture.narRequests(upstream).count
    try expectGoodReads(node, Self.reads)
    #expect(proxy.requests.contains { $0.hasPrefix("/nixfs/v1/\(what)") }, "the proxy was asked for \(what)")
    #expect(StoreFixture.narRequests(upstream).count - narsBefore == 1, "one NAR from upstream")
    let log = node.daemon.stderr
    let counted = try fallThroughs(port, of: proxy.url)
    if what == "chunks" {
      #expect(log.contains("completing the path from a whole NAR") && log.contains("completed from a whole NAR"), "\(log.suffix(3000))")
      #expect(counted["chunk_rejected", default: 0] >= 1, "\(counted)")
      let stats = try run([nixfsBinary, "stats", "--state-dir", node.stateDir]).text
      #expect(stats.contains(" 0 partial"), "\(stats)")
    } else {
      #expect(log.contains("chunk index not used"), "\(log.suffix(3000))")
      #expect(counted["index_refused", default: 0] >= 1, "\(counted)")
    }
    #expect(Set(counted.keys).isSubset(of: ["chunk_rejected", "index_refused", "corrupt", "hash_mismatch"]), "\(counted)")
    #expect(counted["corrupt", default: 0] + counted["hash_mismatch", default: 0] >= 1, "its NAR was tried: \(counted)")
  }

  /// With no good substituter left the read fails, and the error names what each one did.
  @Test func withNoGoodCacheLeftTheErrorNamesEachCause() throws {
    let tmp = try TemporaryDirectory("fallthrough-none")
    let corrupting = try CacheServer(directory: fx.cache, corrupt: "^/nar/")
    let failing = try CacheServer(directory: fx.cache, fail: "^/nar/")
    let (node, _) = try mount(tmp, [corrupting.url, failing.url], keys: [fx.publicKey])
    defer { node.stop() }
    #expect(throws: (any Error).self) { try contents(node.path("\(fx.other.baseName)/data")) }
    let log = node.daemon.stderr
    let line = log.split(separator: "\n").first { $0.contains("every substituter failed") }
    #expect(line != nil, "\(log.suffix(3000))")
    if let line {
      #expect(line.contains(corrupting.url) && line.contains(failing.url) && line.contains("HTTP 500"), "\(line)")
    }
    // Not remembered as missing: it was there, just not deliverable.
    #expect(!log.contains("not in any cache"), "\(log.suffix(3000))")
  }
}
