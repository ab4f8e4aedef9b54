import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// FUSE passthrough on real mounts: a complete file's open is answered with its backing file, and
/// the kernel reads and maps that file itself. Serialized: they count the daemon's requests.
@Suite(.serialized) struct PassthroughTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  struct Node {
    let store: MountedStore
    let port: Int
    var backingDir: String { "\(store.stateDir)/backing" }
  }

  func mount(_ server: CacheServer, _ tmp: TemporaryDirectory, extra: [String] = []) throws -> Node {
    let port = try freePort()
    let store = try MountedStore(
      mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"),
      arguments: fx.mountArguments(server, extra: ["--metrics-listen", "127.0.0.1:\(port)"] + extra))
    return Node(store: store, port: port)
  }

  /// One series of the daemon's metrics, e.g. `nixfs_fuse_requests_total{op="read"}`.
  func metric(_ node: Node, _ series: String) throws -> Double {
    let text = try run(["curl", "-sf", "http://127.0.0.1:\(node.port)/metrics"]).text
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
      return Double(line.split(separator: " ").last ?? "") ?? -1
    }
    Issue.record("no \(series) in the daemon's metrics")
    return -1
  }

  func status(_ node: Node) throws -> String {
    try run([nixfsBinary, "status", "--state-dir", node.store.stateDir]).text
  }

  /// Backing files by size.
  func backingSizes(_ node: Node) -> [UInt64] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: node.backingDir)) ?? []
    return names.filter { !$0.hasPrefix(".") }.compactMap { name in
      var st = stat()
      return stat("\(node.backingDir)/\(name)", &st) == 0 ? UInt64(st.st_size) : nil
    }.sorted()
  }

  func eventually(_ seconds: Double = 120, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
      let late = Date() > deadline
      if try condition() { return true }
      if late { return false }
      usleep(50_000)
    }
  }

  func contents(_ path: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }

  /// SHA-256 of a file read through mmap, page by page (what a loader does with a library).
  func mappedDigest(_ path: String) throws -> String {
    try run([
      "python3", "-c",
      "import hashlib, mmap, sys\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nprint(hashlib.sha256(m[:]).hexdigest())",
      path,
    ]).trimmed
  }

  func sha256(_ bytes: [UInt8]) -> String { NixHash.sha256(bytes).hex }

  var bigFile: (mounted: String, original: String) {
    let kinds = fx.paths["kinds"]!
    return ("\(kinds.baseName)/big.bin", "\(fx.trees[kinds]!)/big.bin")
  }

  @Test func completeFilesArePassedThroughByteIdenticalAndMapped() throws {
    let tmp = try TemporaryDirectory("pt-read")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let node = try mount(server, tmp)
    #expect(try eventually(120) { try status(node).contains("passthrough: on") }, "\((try? status(node)) ?? "")")
    #expect(try metric(node, "nixfs_passthrough_available") == 1)
    let (mounted, original) = bigFile
    let expected = try contents(original)
    // The first open reads through the daemon (there is no backing file yet) and has one made.
    #expect(try contents(node.store.path(mounted)) == expected)
    #expect(eventually { backingSizes(node).contains(UInt64(expected.count)) }, "no backing file was made")
    #expect(try eventually(120) { try status(node).contains("0 large files open") })
    let reads = try metric(node, "nixfs_fuse_requests_total{op=\"read\"}")
    let opens = try metric(node, "nixfs_passthrough_opens_total")
    #expect(try contents(node.store.path(mounted)) == expected)
    #expect(try mappedDigest(node.store.path(mounted)) == sha256(expected))
    #expect(try metric(node, "nixfs_passthrough_opens_total") >= opens + 2)
    #expect(try metric(node, "nixfs_fuse_requests_total{op=\"read\"}") == reads, "the kernel read the backing file, not the daemon")
    // Files below the threshold are read through the daemon and get none.
    let small = "\(fx.paths["kinds"]!.baseName)/hello.txt"
    _ = try contents(node.store.path(small))
    _ = try contents(node.store.path(small))
    #expect(try metric(node, "nixfs_fuse_requests_total{op=\"read\"}") > reads)
    #expect(backingSizes(node) == [UInt64(expected.count)])
  }

  /// Two paths with the same 3 MiB file share one backing file, so one page cache.
  @Test func identicalContentSharesOneBackingFile() throws {
    let tmp = try TemporaryDirectory("pt-twins")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let node = try mount(server, tmp)
    #expect(try eventually(120) { try status(node).contains("passthrough: on") })
    let a = node.store.path("\(fx.paths["twin-a"]!.baseName)/share/blob")
    let b = node.store.path("\(fx.paths["twin-b"]!.baseName)/share/blob")
    let blob = try contents(a)
    #expect(blob.count == 3 << 20)
    #expect(eventually { backingSizes(node) == [3 << 20] })
    #expect(try contents(b) == blob)
    #expect(try contents(a) == blob)
    #expect(backingSizes(node) == [3 << 20], "one backing file for both paths")
    let name = try FileManager.default.contentsOfDirectory(atPath: node.backingDir).first { !$0.hasPrefix(".") }!
    #expect(try contents("\(node.backingDir)/\(name)") == blob, "the backing file holds the plain bytes")
  }

  /// The budget of backing files evicts least recently opened ones, never one that is open.
  @Test func aBackingFileInUseIsNeverEvicted() throws {
    let tmp = try TemporaryDirectory("pt-evict")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    // Room for the 6 MiB file but not for it and the 3 MiB one.
    let node = try mount(server, tmp, extra: ["--passthrough-max-size", "7M"])
    #expect(try eventually(120) { try status(node).contains("passthrough: on") })
    let (mounted, original) = bigFile
    let big = try contents(original)
    let twin = node.store.path("\(fx.paths["twin-a"]!.baseName)/share/blob")
    #expect(try contents(node.store.path(mounted)) == big)
    #expect(eventually { backingSizes(node) == [UInt64(big.count)] })
    #expect(try eventually(120) { try status(node).contains("0 large files open") })
    // Held open, passed through: its backing file is registered with the kernel.
    let held = try FileHandle(forReadingFrom: URL(fileURLWithPath: node.store.path(mounted)))
    let head = try held.read(upToCount: 1 << 20) ?? Data()
    #expect(Array(head) == Array(big[0..<(1 << 20)]))
    #expect(try status(node).contains("1 backing files registered"), "\((try? status(node)) ?? "")")
    let blob = try contents(twin)
    #expect(try eventually { try metric(node, "nixfs_passthrough_backing_files_made_total") == 2 })
    #expect(eventually { backingSizes(node) == [UInt64(big.count)] }, "the new file went, the open one stayed: \(backingSizes(node))")
    let rest = try held.readToEnd() ?? Data()
    #expect(Array(head + rest) == big)
    try held.close()
    #expect(try eventually(120) { try status(node).contains("0 large files open") })
    // Closed, it is the least recently opened: the next one made takes its place.
    #expect(try contents(twin) == blob)
    #expect(eventually { backingSizes(node) == [3 << 20] }, "\(backingSizes(node))")
    #expect(try contents(node.store.path(mounted)) == big)
  }

  @Test func offReadsEverythingThroughTheDaemon() throws {
    let tmp = try TemporaryDirectory("pt-off")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let node = try mount(server, tmp, extra: ["--passthrough", "off"])
    let (mounted, original) = bigFile
    let reads = try metric(node, "nixfs_fuse_requests_total{op=\"read\"}")
    #expect(try contents(node.store.path(mounted)) == (try contents(original)))
    #expect(try contents(node.store.path(mounted)) == (try contents(original)))
    #expect(try metric(node, "nixfs_fuse_requests_total{op=\"read\"}") > reads)
    #expect(try metric(node, "nixfs_passthrough_available") == 0)
    #expect(try status(node).contains("passthrough: off: --passthrough off"))
    #expect(backingSizes(node).isEmpty)
  }

  enum Switch: String, CaseIterable { case takeover, crash }

  /// Files open through passthrough when the daemon is replaced (a takeover, or SIGKILL with a
  /// keeper): reads of the open file go on, and new opens of it get the same backing file.
  @Test(arguments: Switch.allCases)
  func openFilesSurviveTheSwitch(_ how: Switch) throws {
    let tmp = try TemporaryDirectory("pt-switch")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let kept = try KeptMount(in: tmp)
    let arguments = ["--keeper", kept.socket] + fx.mountArguments(server)
    let first = try MountedStore(mountpoint: kept.mountpoint, stateDir: tmp.sub("state"), arguments: arguments)
    kept.daemons.append(first.daemon)
    let node = Node(store: first, port: 0)
    #expect(try eventually(120) { try status(node).contains("passthrough: on") })
    let (mounted, original) = bigFile
    let big = try contents(original)
    #expect(try contents(first.path(mounted)) == big)
    #expect(eventually { backingSizes(node) == [UInt64(big.count)] })
    #expect(try eventually(120) { try status(node).contains("0 large files open") })
    let held = try FileHandle(forReadingFrom: URL(fileURLWithPath: first.path(mounted)))
    let head = try held.read(upToCount: 1 << 20) ?? Data()
    #expect(try status(node).contains("1 backing files registered"))
    if how == .crash { first.daemon.signal(SIGKILL) }
    let next = try BackgroundProcess([nixfsBinary, "mount", "--state-dir", tmp.sub("state")] + arguments + [kept.mountpoint])
    kept.daemons.append(next)
    #expect(first.daemon.wait(seconds: 30))
    #expect(try eventually(120) { (try? status(node))?.contains("pid \(next.process.processIdentifier)") == true }, "\(next.stderr)")
    // A second open while the first is open: the kernel insists on the same backing file.
    #expect(try contents(first.path(mounted)) == big, "\(next.stderr)")
    let rest = try held.readToEnd() ?? Data()
    #expect(Array(head + rest) == big)
    #expect(try status(node).contains("passthrough: on"), "\((try? status(node)) ?? "")")
    try held.close()
    #expect(try eventually(120) { try status(node).contains("0 backing files registered, 0 large files open") }, "\((try? status(node)) ?? "")")
    #expect(try mappedDigest(first.path(mounted)) == sha256(big))
    #expect(next.isRunning, "\(next.stderr)")
  }
}
