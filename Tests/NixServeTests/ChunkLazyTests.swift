import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A large store path (about 100 MiB) and a small unrelated one, signed and in a zstd cache:
/// the upstream of a serve that nodes read chunk by chunk.
final class LargePathFixture: @unchecked Sendable {
  let tmp: TemporaryDirectory
  let publicKey: String
  let big: StorePath
  let other: StorePath
  let tree: String
  let cache: String

  private static let once = OnceFixture { try LargePathFixture() }
  static func shared() throws -> LargePathFixture { try once.get() }

  init() throws {
    tmp = try TemporaryDirectory("chunk-lazy-fixture", forProcess: true)
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("upstream-1")
    publicKey = pk
    tree = tmp.sub("big")
    try Tree.file("\(tree)/lib/a.so", Tree.bytes(48 << 20, seed: 11))
    try Tree.file("\(tree)/lib/b.so", Tree.bytes(48 << 20, seed: 12))
    try Tree.file("\(tree)/bin/tool", Tree.bytes(1 << 20, seed: 13), executable: true)
    try Tree.file("\(tree)/etc/hello.txt", "hello from a lazy path\n")
    for i in 0..<40 { try Tree.file("\(tree)/share/doc/\(i).txt", Tree.bytes(1000 + 50 * i, seed: UInt64(100 + i))) }
    try Tree.symlink("\(tree)/bin/alias", to: "tool")
    big = try StorePath(nix.add(tree))
    let o = tmp.sub("other")
    try Tree.file("\(o)/data", "another path\n")
    other = try StorePath(nix.add(o))
    try nix.sign([big.path, other.path], keyFile: sk)
    cache = tmp.sub("cache")
    try nix.copy([big.path, other.path], toCache: cache, compression: "zstd")
  }

  func narInfo(_ path: StorePath) throws -> NarInfo {
    try NarInfo(parsing: String(contentsOfFile: "\(cache)/\(path.hashPart).narinfo", encoding: .utf8))
  }
}

/// Chunk-lazy nodes: a node that trusts a serve's key materialises a path from its signed chunk
/// index at once and fetches only the chunks that reads touch, each checked against its digest.
@Suite(.serialized) struct ChunkLazyTests {
  let fx: LargePathFixture
  init() throws { fx = try LargePathFixture.shared() }

  /// A serve holding the fixture (pulled through once), its key, and an empty node state.
  struct Setup {
    let tmp: TemporaryDirectory
    let upstream: CacheServer
    let serve: Serve
    let serveKey: String
  }

  func setUp(_ label: String, warm: Bool = true) throws -> Setup {
    let tmp = try TemporaryDirectory(label)
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("serve-1")
    let upstream = try CacheServer(directory: fx.cache)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("serve"), extra: ["--secret-key-file", sk])
    // The serve holds the path before any node asks (`nixfs-chunk`).
    if warm { #expect(try get("\(serve.url)/\(fx.big.hashPart).narinfo").status == 200) }
    return Setup(tmp: tmp, upstream: upstream, serve: serve, serveKey: pk)
  }

  func mount(
    _ s: Setup, trusting keys: [String], extra: [String] = [], mountpoint: String? = nil, state: String = "node",
    substituter: String? = nil
  ) throws -> MountedStore {
    try MountedStore(
      mountpoint: mountpoint ?? s.tmp.sub("mnt"), stateDir: s.tmp.sub(state),
      arguments: ["--substituter", substituter ?? s.serve.url, "--log-level", "info"] + keys.flatMap { ["--trusted-public-key", $0] }
        + extra)
  }

  /// What the CSI plugin asks the daemon on NodePublishVolume, over the control socket.
  func publish(_ s: Setup, _ volume: String, _ path: StorePath, state: String = "node") throws -> String {
    try run(["python3", "-c", """
      import json, socket, sys
      s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
      s.sendall((json.dumps({"publish": {"volumeID": sys.argv[3], "storePath": sys.argv[2]}}) + "\\n").encode())
      print(s.makefile().readline())
      """, s.tmp.sub(state) + "/control.sock", path.path, volume]).text
  }

  /// Polls `condition` for up to `seconds`.
  func eventually(_ seconds: Double, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
      if try condition() { return true }
      usleep(100_000)
    }
    return try condition()
  }

  /// A counter's value in the serve's Prometheus text.
  func metric(_ serve: Serve, _ name: String) throws -> Double {
    let text = try get("\(serve.url)/metrics").body
    for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
      return Double(line.split(separator: " ")[1]) ?? -1
    }
    Issue.record("no \(name) in the serve's metrics")
    return -1
  }

  func contents(_ path: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }

  @Test func aFileOfALargePathFetchesOnlyItsChunks() throws {
    let s = try setUp("lazy-read")
    let node = try mount(s, trusting: [fx.publicKey, s.serveKey])
    defer { node.stop() }
    let root = node.path(fx.big.baseName)
    // The tree is there before any data: listing and stat cost no chunk.
    let names = try FileManager.default.contentsOfDirectory(atPath: "\(root)/lib").sorted()
    #expect(names == ["a.so", "b.so"])
    let attrs = try FileManager.default.attributesOfItem(atPath: "\(root)/lib/a.so")
    #expect((attrs[.size] as? Int) == 48 << 20)
    #expect(try metric(s.serve, "nixfs_serve_chunk_served_bytes_total") == 0)
    // One 1 MiB file of a 97 MiB path.
    #expect(try contents("\(root)/bin/tool") == (try contents("\(fx.tree)/bin/tool")))
    #expect(try String(contentsOfFile: "\(root)/etc/hello.txt", encoding: .utf8) == "hello from a lazy path\n")
    let sent = try metric(s.serve, "nixfs_serve_chunk_served_bytes_total")
    #expect(sent >= 1_048_576 && sent < 1.4 * 1_048_576, "the node fetched \(sent) bytes for 1 MiB of files")
    #expect(try metric(s.serve, "nixfs_serve_nar_served_bytes_total") == 0, "no NAR may move")
    // Everything, then the whole path dumps to its signed NarHash.
    for file in ["lib/a.so", "lib/b.so", "share/doc/7.txt", "share/doc/39.txt"] {
      #expect(try contents("\(root)/\(file)") == (try contents("\(fx.tree)/\(file)")), "\(file)")
    }
    let nar = try NixFixture.dump(root)
    #expect(NixHash.sha256(nar) == (try fx.narInfo(fx.big)).narHash)
    // A second read costs nothing: the chunks are in the node's store.
    let before = try metric(s.serve, "nixfs_serve_chunks_served_total")
    _ = try NixFixture.dump(root)
    #expect(try metric(s.serve, "nixfs_serve_chunks_served_total") == before)
  }

  /// One series of a node's metrics.
  func nodeMetric(_ port: Int, _ name: String) throws -> Double {
    for line in try httpBody("http://127.0.0.1:\(port)/metrics").split(separator: "\n") where line.hasPrefix(name + " ") {
      return Double(line.split(separator: " ").last ?? "") ?? -1
    }
    Issue.record("no \(name) in the node's metrics")
    return -1
  }

  /// 1 MiB from the middle of a 48 MiB file of a partial path: a miss fetches the chunks around it
  /// in one batch request.
  func readMiddle(_ node: MountedStore) throws -> Bool {
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: node.path("\(fx.big.baseName)/lib/a.so")))
    defer { try? h.close() }
    try h.seek(toOffset: 10 << 20)
    let got = try h.read(upToCount: 1 << 20) ?? Data()
    let want = try contents("\(fx.tree)/lib/a.so")[(10 << 20)..<(11 << 20)]
    return Array(got) == Array(want)
  }

  enum BatchFault: String, CaseIterable { case corrupt, truncate }

  /// A batch answer with a corrupted chunk, or cut off mid-stream (through a proxy in front of the
  /// serve): every chunk that arrived whole and verified is kept, the others come one by one, and
  /// the reads return the right bytes.
  @Test(arguments: BatchFault.allCases)
  func aBadBatchKeepsWhatVerified(_ fault: BatchFault) throws {
    let s = try setUp("lazy-batch-\(fault)")
    let batches = "^/nixfs/v1/chunks$"
    let proxy = try CacheServer(
      upstream: s.serve.url, corrupt: fault == .corrupt ? batches : nil, truncate: fault == .truncate ? batches : nil)
    let port = try freePort()
    let node = try mount(
      s, trusting: [fx.publicKey, s.serveKey], extra: ["--metrics-listen", "127.0.0.1:\(port)"], substituter: proxy.url)
    defer { node.stop() }
    #expect(try readMiddle(node), "\(node.daemon.stderr.suffix(2000))")
    let fetched = try nodeMetric(port, "nixfs_chunks_fetched_total")
    let single = proxy.requests.filter { $0.hasPrefix("/nixfs/v1/chunks/") }.count
    #expect(try nodeMetric(port, "nixfs_chunk_batches_total") >= 1)
    #expect(proxy.requests.contains("/nixfs/v1/chunks"))
    #expect(single >= 1, "what the batch did not deliver came alone")
    #expect(Double(single) < fetched, "the batch's good chunks were kept: \(single) alone of \(fetched)")
    if fault == .corrupt {
      #expect(try nodeMetric(port, "nixfs_chunks_rejected_total") >= 1)
    } else {
      #expect(node.daemon.stderr.contains("a chunk batch ended early"), "\(node.daemon.stderr.suffix(2000))")
    }
    #expect(try metric(s.serve, "nixfs_serve_nar_served_bytes_total") == 0, "no NAR was needed")
  }

  /// FUSE passthrough needs every byte of a file local: a file of a partial path gets no backing
  /// file while chunks of it are missing, and gets one, and passes through, once it is complete.
  @Test func aPartialFileIsPassedThroughOnlyOnceComplete() throws {
    let s = try setUp("lazy-passthrough")
    let node = try mount(s, trusting: [fx.publicKey, s.serveKey])
    defer { node.stop() }
    func status() -> String { (try? run([nixfsBinary, "status", "--state-dir", s.tmp.sub("node")]).text) ?? "" }
    func backingSizes() -> [Int] {
      let dir = s.tmp.sub("node") + "/backing"
      return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { !$0.hasPrefix(".") }.compactMap {
        (try? FileManager.default.attributesOfItem(atPath: "\(dir)/\($0)"))?[.size] as? Int
      }.sorted()
    }
    #expect(eventually(120) { status().contains("passthrough: on") }, "\(status())")
    let root = node.path(fx.big.baseName)
    // 64 KiB of a 48 MiB file: the rest of its chunks stay on the serve.
    let partial = try FileHandle(forReadingFrom: URL(fileURLWithPath: "\(root)/lib/a.so"))
    let head = try partial.read(upToCount: 65536) ?? Data()
    try partial.close()
    #expect(Array(head) == Array(try contents("\(fx.tree)/lib/a.so")[0..<65536]))
    // A 1 MiB file, read whole (complete) and opened again after it gets its backing file (one
    // maker, in order): by then the partial one was tried, and has none.
    #expect(try contents("\(root)/bin/tool") == (try contents("\(fx.tree)/bin/tool")))
    #expect(eventually(120) { status().contains("0 large files open") })
    _ = try contents("\(root)/bin/tool")
    #expect(eventually(120) { backingSizes().contains(1 << 20) }, "\(backingSizes())")
    #expect(!backingSizes().contains(48 << 20), "a partial file got a backing file")
    // Read whole, it is complete: the next open has one made, and the one after passes through.
    #expect(try contents("\(root)/lib/a.so") == (try contents("\(fx.tree)/lib/a.so")))
    #expect(eventually(120) { status().contains("0 large files open") })
    _ = try contents("\(root)/lib/a.so")
    #expect(eventually(120) { backingSizes().contains(48 << 20) }, "\(backingSizes())")
    #expect(eventually(120) { status().contains("0 large files open") })
    let held = try FileHandle(forReadingFrom: URL(fileURLWithPath: "\(root)/lib/a.so"))
    defer { try? held.close() }
    #expect(status().contains("1 backing files registered"), "\(status())")
    #expect(Array(try held.readToEnd() ?? Data()) == (try contents("\(fx.tree)/lib/a.so")))
  }

  /// NodePublishVolume on a cold node, with a cold serve: the closure's narinfos in one request
  /// (no narinfo request of its own), the serve pulls the path through for its index, and the
  /// tree is here before the pod looks; no NAR moves to the node.
  @Test func aPublishMakesTheTreesLocalBeforeThePodLooks() throws {
    let s = try setUp("lazy-publish", warm: false)
    let node = try mount(s, trusting: [fx.publicKey, s.serveKey])
    defer { node.stop() }
    func publish(_ volume: String, _ path: StorePath) throws -> String { try self.publish(s, volume, path) }
    let reply = try publish("pod-1", fx.big)
    #expect(reply.contains("viewPath"), "\(reply)")
    #expect(try metric(s.serve, "nixfs_serve_manifests_served_total") == 1)
    #expect(try metric(s.serve, "nixfs_serve_paths_pulled_total") == 1, "pulled through for its index")
    let stats = try run([nixfsBinary, "stats", "--state-dir", s.tmp.sub("node")]).text
    #expect(stats.contains("0 complete, 1 partial"), "\(stats)")
    #expect(try String(contentsOfFile: node.path(".views/pod-1/store/\(fx.big.baseName)/etc/hello.txt"), encoding: .utf8)
      == "hello from a lazy path\n")
    #expect(try metric(s.serve, "nixfs_serve_nar_served_bytes_total") == 0)
    // A path the serve holds: a narinfo request for it would be a hit; the closure request is not.
    #expect(try get("\(s.serve.url)/\(fx.other.hashPart).narinfo").status == 200)
    #expect(try get("\(s.serve.url)/\(fx.other.hashPart).narinfo").status == 200)
    let hits = try metric(s.serve, "nixfs_serve_narinfo_hits_total")
    #expect(try publish("pod-2", fx.other).contains("viewPath"))
    #expect(try metric(s.serve, "nixfs_serve_narinfo_hits_total") == hits, "the closure came in one request")
    #expect(try metric(s.serve, "nixfs_serve_manifests_served_total") == 2)
  }

  /// Learned prefetch: a pod's first reads become the path's startup profile at the serve; a
  /// cold node publishing the path fetches those chunks before its pod reads anything.
  @Test func aStartupProfileIsLearnedAndPrefetched() throws {
    let s = try setUp("lazy-profile")
    let keys = [fx.publicKey, s.serveKey]
    let first = try mount(s, trusting: keys, extra: ["--startup-profile-seconds", "1"])
    defer { first.stop() }
    #expect(try publish(s, "pod-a", fx.big).contains("viewPath"))
    let view = first.path(".views/pod-a/store/\(fx.big.baseName)")
    #expect(try contents("\(view)/bin/tool") == (try contents("\(fx.tree)/bin/tool")))
    let profileURL = "\(s.serve.url)/nixfs/v1/profiles/\(fx.big.hashPart)"
    #expect(try eventually(10) { try get(profileURL).status == 200 }, "no profile was reported")
    let profile = try JSONSerialization.jsonObject(with: Data(try get(profileURL).body.utf8)) as? [String: Any]
    let entries = (profile?["chunks"] as? [[String]]) ?? []
    #expect(entries.count >= 8, "\(entries.count) chunks for a 1 MiB file")
    first.stop()

    let second = try mount(s, trusting: keys, mountpoint: s.tmp.sub("mnt2"), state: "node2")
    defer { second.stop() }
    let before = try metric(s.serve, "nixfs_serve_chunk_served_bytes_total")
    #expect(try publish(s, "pod-b", fx.big, state: "node2").contains("viewPath"))
    #expect(
      try eventually(10) { try metric(s.serve, "nixfs_serve_chunk_served_bytes_total") - before >= 1_048_576 },
      "the profile's chunks were not prefetched")
    let prefetched = try metric(s.serve, "nixfs_serve_chunks_served_total")
    #expect(try contents(second.path(".views/pod-b/store/\(fx.big.baseName)/bin/tool")) == (try contents("\(fx.tree)/bin/tool")))
    #expect(try metric(s.serve, "nixfs_serve_chunks_served_total") == prefetched, "the pod's reads were all prefetched")

    // Reports are untrusted: malformed ones are refused, chunks the serve does not hold dropped.
    let post = """
      import sys, urllib.request, urllib.error
      try:
          r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST")); print(r.status, r.read().decode())
      except urllib.error.HTTPError as e:
          print(e.code)
      """
    #expect(try run(["python3", "-c", post, profileURL, "junk"]).trimmed == "400")
    let foreign = "{\"version\":1,\"chunks\":[[\"\(String(repeating: "ab", count: 32))\",\"100\"]]}"
    #expect(try run(["python3", "-c", post, profileURL, foreign]).trimmed.contains("\"chunks\":\(entries.count)"))
  }

  /// After a restart the partial path and the chunks fetched so far are still there.
  @Test func fetchedChunksSurviveARestartAndFetchCompletesThePath() throws {
    let s = try setUp("lazy-restart")
    let first = try mount(s, trusting: [fx.publicKey, s.serveKey])
    defer { first.stop() }
    #expect(try contents(first.path("\(fx.big.baseName)/bin/tool")) == (try contents("\(fx.tree)/bin/tool")))
    first.stop()
    let sent = try metric(s.serve, "nixfs_serve_chunks_served_total")
    // Another mountpoint: the first one's teardown must not touch this mount.
    let node = try mount(s, trusting: [fx.publicKey, s.serveKey], mountpoint: s.tmp.sub("mnt2"))
    defer { node.stop() }
    #expect(try contents(node.path("\(fx.big.baseName)/bin/tool")) == (try contents("\(fx.tree)/bin/tool")))
    #expect(try metric(s.serve, "nixfs_serve_chunks_served_total") == sent, "the chunks were kept")
    // `nixfs fetch` through the daemon completes the path: every chunk, then the NarHash.
    let fetched = try run([nixfsBinary, "fetch", "--state-dir", s.tmp.sub("node"), fx.big.path], check: false)
    #expect(fetched.status == 0, "\(fetched.stderr)")
    let stats = try run([nixfsBinary, "stats", "--state-dir", s.tmp.sub("node")], check: false)
    #expect(stats.text.contains(" 0 partial") && stats.text.contains("chunks to fetch:   0 "), "\(stats.text)")
    let nar = try NixFixture.dump(node.path(fx.big.baseName))
    #expect(NixHash.sha256(nar) == (try fx.narInfo(fx.big)).narHash)
  }

  /// A node that does not trust the serve's key believes its narinfo (upstream-signed) but not its
  /// chunk index: the path comes whole, as from any cache.
  @Test func anUntrustedIndexFallsBackToTheWholeNAR() throws {
    let s = try setUp("lazy-untrusted")
    let node = try mount(s, trusting: [fx.publicKey])
    defer { node.stop() }
    let root = node.path(fx.big.baseName)
    #expect(try String(contentsOfFile: "\(root)/etc/hello.txt", encoding: .utf8) == "hello from a lazy path\n")
    #expect(try metric(s.serve, "nixfs_serve_chunk_served_bytes_total") == 0)
    #expect(try metric(s.serve, "nixfs_serve_nar_served_bytes_total") > 90 * 1024 * 1024)
    #expect(node.daemon.stderr.contains("chunk index not used"), "\(node.daemon.stderr.suffix(2000))")
  }

  /// An index altered on the way (a lying HTTP cache in front of the serve, here a static copy of
  /// what the serve sent with one byte of the manifest changed) is refused: the path comes whole.
  @Test func aTamperedIndexFallsBackToTheWholeNAR() throws {
    let s = try setUp("lazy-tampered-index")
    let info = try fx.narInfo(fx.big)
    let lying = s.tmp.sub("lying")
    try run(["cp", "-a", fx.cache, lying])
    try "StoreDir: /nix/store\nPriority: 30\nNixfsChunkIndex: nixfs/v1\n".write(
      toFile: "\(lying)/nix-cache-info", atomically: true, encoding: .utf8)
    var document = try run([
      "python3", "-c", "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
      "\(s.serve.url)/nixfs/v1/manifests/\(info.narHash.nix32Digest)",
    ]).stdout
    // One file of the tree becomes executable: still well-formed, no longer what was signed.
    let text = String(decoding: document, as: UTF8.self)
    let altered = text.replacingOccurrences(of: "\\\"executable\\\":false", with: "\\\"executable\\\":true")
    #expect(altered != text, "the document has no file to alter")
    document = Array(altered.utf8)
    try Tree.file("\(lying)/nixfs/v1/manifests/\(info.narHash.nix32Digest)", document)
    let cache = try CacheServer(directory: lying)
    let node = try MountedStore(
      mountpoint: s.tmp.sub("mnt"), stateDir: s.tmp.sub("node"),
      arguments: ["--substituter", cache.url, "--trusted-public-key", fx.publicKey, "--trusted-public-key", s.serveKey])
    defer { node.stop() }
    #expect(try contents(node.path("\(fx.big.baseName)/bin/tool")) == (try contents("\(fx.tree)/bin/tool")))
    #expect(cache.requests.contains { $0.hasPrefix("/nixfs/v1/manifests/") }, "the index was asked for")
    #expect(!cache.requests.contains { $0.hasPrefix("/nixfs/v1/chunks/") }, "no chunk of a refused index is fetched")
    #expect(StoreFixture.narRequests(cache).count == 1, "the path came whole")
    #expect(node.daemon.stderr.contains("chunk index not used"), "\(node.daemon.stderr.suffix(2000))")
  }

  /// A serve whose stored bytes went bad sends chunks that do not match their digests: the read
  /// fails with EIO, the bad bytes are never served or kept, and other files still read.
  @Test func aTamperedChunkIsNeverServed() throws {
    let s = try setUp("lazy-tamper")
    // Flip bytes across the serve's pack files: the big files are most of their bytes.
    let packs = s.tmp.sub("serve") + "/packs"
    for name in try FileManager.default.contentsOfDirectory(atPath: packs) {
      let fd = open("\(packs)/\(name)", O_RDWR)
      #expect(fd >= 0)
      var st = stat()
      _ = fstat(fd, &st)
      var at = Int64(st.st_size) / 8
      while at < Int64(st.st_size) {
        var byte: UInt8 = 0
        _ = pread(fd, &byte, 1, off_t(at))
        byte ^= 0x5a
        _ = pwrite(fd, &byte, 1, off_t(at))
        at += 4 << 20
      }
      close(fd)
    }
    let node = try mount(s, trusting: [fx.publicKey, s.serveKey])
    defer { node.stop() }
    let root = node.path(fx.big.baseName)
    #expect(throws: (any Error).self) { _ = try contents("\(root)/lib/a.so").count }
    #expect(throws: (any Error).self, "refused bytes must not have been kept") { _ = try contents("\(root)/lib/a.so").count }
    #expect(try String(contentsOfFile: "\(root)/etc/hello.txt", encoding: .utf8) == "hello from a lazy path\n")
    let log = node.daemon.stderr
    #expect(log.contains("do not hash to its name") || log.contains("not one zstd frame"), "\(log.suffix(3000))")
    #expect(log.contains(fx.big.path), "the log names the path")
  }

  /// The serve dies mid-read: a read of chunks not fetched yet completes the path from the next
  /// substituter's whole NAR (within the transfer's retries and timeouts), chunks already here
  /// still read, and paths from the next substituter are served.
  @Test func aDeadServeFallsBackToTheNextSubstituter() throws {
    let s = try setUp("lazy-dead")
    let node = try mount(
      s, trusting: [fx.publicKey, s.serveKey],
      extra: ["--substituter", s.upstream.url, "--connect-timeout", "2", "--stall-timeout", "3"])
    defer { node.stop() }
    let root = node.path(fx.big.baseName)
    #expect(try contents("\(root)/bin/tool") == (try contents("\(fx.tree)/bin/tool")))
    let narsBefore = StoreFixture.narRequests(s.upstream).count
    s.serve.process.signal(SIGKILL)
    _ = s.serve.process.wait(seconds: 10)
    let start = Date()
    let read = try contents("\(root)/lib/b.so") == (try contents("\(fx.tree)/lib/b.so"))
    #expect(read, "lib/b.so read wrong bytes: \(node.daemon.stderr.suffix(3000))")
    #expect(Date().timeIntervalSince(start) < 60, "the read took \(Date().timeIntervalSince(start)) s")
    #expect(StoreFixture.narRequests(s.upstream).count == narsBefore + 1, "the path came from upstream's NAR")
    #expect(node.daemon.stderr.contains("completed from a whole NAR"), "\(node.daemon.stderr.suffix(3000))")
    #expect(try contents("\(root)/bin/tool") == (try contents("\(fx.tree)/bin/tool")))
    #expect(try String(contentsOfFile: node.path("\(fx.other.baseName)/data"), encoding: .utf8) == "another path\n")
  }
}
