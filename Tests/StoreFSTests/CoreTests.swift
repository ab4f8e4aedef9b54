import ChunkStore
import Foundation
import Logging
import NixFormats
@testable import StoreFS
import Synchronization
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// The filesystem core in process: no FUSE, no mount, no network. A recording replier stands for
/// the kernel and a materialiser that ingests prepared NARs (or serves chunks from another
/// store) for the caches, so the core's decisions are visible one reply at a time.
@Suite struct CoreTests {
  /// What the core answered one request with.
  final class Recorder: Replier, @unchecked Sendable {
    enum Reply: Equatable {
      case entry(ino: UInt64, size: Int, timeout: Double)
      case attributes(size: Int)
      case error(Int32)
      case bytes([UInt8])
      case symlink([UInt8])
      case opened(keepCache: Bool, cacheDirectory: Bool)
      case passthrough(backing: Int32)
      case listing([String])
      case filesystem
    }
    private let got = Mutex<Reply?>(nil)

    private func record(_ r: Reply) {
      got.withLock {
        precondition($0 == nil, "a request was answered twice")
        $0 = r
      }
    }

    /// The answer, waiting for it up to `seconds` (answers after a fetch come from a task). It
    /// waits by sleeping, never by blocking a thread the core's tasks need. Long by default: in
    /// the full run this process's tasks may stand still for a minute (CI once missed 10 s).
    func reply(within seconds: Double = 300) async -> Reply? {
      let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
      while ContinuousClock.now < deadline {
        if let r = got.withLock({ $0 }) { return r }
        try? await Task.sleep(for: .milliseconds(5))
      }
      return got.withLock { $0 }
    }

    func entry(ino: UInt64, attr: stat, timeout: Double) -> Bool {
      record(.entry(ino: ino, size: Int(attr.st_size), timeout: timeout))
      return true
    }
    func attributes(_ attr: stat, timeout: Double) { record(.attributes(size: Int(attr.st_size))) }
    func error(_ errno: Int32) { record(.error(errno)) }
    func bytes(_ data: UnsafeRawBufferPointer) { record(.bytes(Array(data))) }
    func symlink(_ target: [UInt8]) { record(.symlink(target)) }
    func opened(handle: UInt64, keepCache: Bool, cacheDirectory: Bool) {
      record(.opened(keepCache: keepCache, cacheDirectory: cacheDirectory))
    }
    func openedPassthrough(handle: UInt64, backingID: Int32) { record(.passthrough(backing: backingID)) }
    func listingPlus(
      _ entries: [PlusEntry], directory: UInt64, offset: Int, size: Int, timeout: Double, accepted: (Range<Int>) -> Void
    ) {
      accepted(0..<entries.count)
      record(.listing(entries.map { String(decoding: $0.name, as: UTF8.self) }))
    }
    func listing(_ entries: [DirectoryEntry], directory: UInt64, offset: Int, size: Int) {
      record(.listing(entries.map { String(decoding: $0.name, as: UTF8.self) }))
    }
    func filesystem(_ vfs: statvfs) { record(.filesystem) }
  }

  /// Stands for the caches: paths it has are ingested from prepared NARs, or registered partial
  /// from a manifest with their chunks served from another store; it counts what it is asked.
  final class Caches: Materialiser, @unchecked Sendable {
    let store: ChunkStore
    var nars: [StorePath: (PathInfo, [UInt8])] = [:]
    var indexes: [StorePath: Manifest] = [:]
    var chunkSource: ChunkStore?
    /// Held closed, materialisations wait (to see lookups share one).
    let gate = DispatchSemaphore(value: 0)
    var gated = false
    let counts = Mutex<(paths: [StorePath: Int], chunks: Int, chunkBytes: Int)>(([:], 0, 0))

    init(store: ChunkStore) { self.store = store }

    func materialise(_ path: StorePath, whole: Bool) async throws -> Manifest? {
      counts.withLock { $0.paths[path, default: 0] += 1 }
      if gated { await withCheckedContinuation { c in DispatchQueue.global().async { self.gate.wait(); self.gate.signal(); c.resume() } } }
      if let manifest = indexes[path] {
        try store.registerPartial(manifest)
        return manifest
      }
      guard let (info, nar) = nars[path] else { throw MaterialiseFailure.notFound(path, cause: FakeFailure("\(path): in no cache")) }
      let ingest = try store.ingest(info)
      try ingest.feed(nar)
      return try ingest.commit()
    }

    func fetchChunks(_ refs: [ChunkRef], for path: StorePath?) async throws {
      guard let source = chunkSource else { throw FakeFailure("no chunk source") }
      for ref in refs {
        let sent = try source.withStoredChunk(ref.id) { chunk, read -> (Bool, [UInt8]) in
          var bytes = [UInt8](repeating: 0, count: chunk.storedSize)
          try bytes.withUnsafeMutableBytes { try read($0) }
          return (chunk.zstd, bytes)
        }
        guard let sent else { throw FakeFailure("chunk \(ref.id) not at the source") }
        try store.accept(ref.id, size: Int(ref.size), zstd: sent.0, bytes: sent.1, source: "test")
        counts.withLock {
          $0.chunks += 1
          $0.chunkBytes += Int(ref.size)
        }
      }
    }

    func materialiseFromIndex(_ path: StorePath) async -> Bool { false }
    func startupProfile(of root: StorePath) async -> [ChunkRef] { [] }
    func reportStartupProfile(_ refs: [ChunkRef], of root: StorePath) async {}
  }

  struct Setup {
    let tmp: TemporaryDirectory
    let store: ChunkStore
    let caches: Caches
    let fs: StoreFileSystem
    let path: StorePath
    let tree: String
  }

  /// A tree of every kind (with a 3 MiB file) as one store path the caches have.
  static func setUp(_ label: String, partial: Bool = false) throws -> Setup {
    let tmp = try TemporaryDirectory(label)
    let tree = tmp.sub("tree")
    try Tree.everyKind(at: tree, bigFileBytes: 3 << 20)
    let nar = try NixFixture.dump(tree)
    let hash = NixHash.sha256(nar)
    let path = try StorePath.addedSource(narHash: hash, name: "core")
    let info = PathInfo(storePath: path, narHash: hash, narSize: UInt64(nar.count))
    let store = try ChunkStore(.init(stateDirectory: tmp.sub("state")))
    let caches = Caches(store: store)
    if partial {
      let source = try ChunkStore(.init(stateDirectory: tmp.sub("source")))
      let ingest = try source.ingest(info)
      try ingest.feed(nar)
      _ = try ingest.commit()
      caches.indexes[path] = try #require(try source.manifest(of: path))
      caches.chunkSource = source
    } else {
      caches.nars[path] = (info, nar)
    }
    var options = StoreFSOptions()
    options.negativeTimeout = 30
    let fs = StoreFileSystem(store: store, materialiser: caches, options: options, logger: Logger(label: "test"))
    return Setup(tmp: tmp, store: store, caches: caches, fs: fs, path: path, tree: tree)
  }

  func lookup(_ fs: StoreFileSystem, _ parent: UInt64, _ name: String) -> Recorder {
    let r = Recorder()
    Array(name.utf8).withUnsafeBytes { fs.lookup(r, parent: parent, name: $0) }
    return r
  }

  func ino(_ reply: Recorder.Reply?) -> UInt64? {
    if case .entry(let ino, _, _) = reply, ino != 0 { return ino }
    return nil
  }

  @Test func aPathNoCacheHasIsNegativeAndRememberedForTheTimeout() async throws {
    let s = try Self.setUp("core-missing")
    let missing = try StorePath(baseName: "00000000000000000000000000000000-nothing")
    #expect(await lookup(s.fs, Inode.root, missing.baseName).reply() == .entry(ino: 0, size: 0, timeout: 30))
    #expect(await lookup(s.fs, Inode.root, missing.baseName).reply() == .entry(ino: 0, size: 0, timeout: 30))
    #expect(s.caches.counts.withLock { $0.paths[missing] } == 1, "the second lookup must not ask the caches")
    // Not a store path name at all: no cache is asked.
    #expect(await lookup(s.fs, Inode.root, "not-a-store-path").reply() == .entry(ino: 0, size: 0, timeout: 30))
  }

  @Test func concurrentLookupsShareOneFetch() async throws {
    let s = try Self.setUp("core-share")
    s.caches.gated = true
    let recorders = (0..<6).map { _ in lookup(s.fs, Inode.root, s.path.baseName) }
    // None is answered while the fetch waits; no FUSE worker waited for it either (we are here).
    for r in recorders { #expect(await r.reply(within: 0.2) == nil) }
    s.caches.gate.signal()
    var inodes: [UInt64?] = []
    for r in recorders { inodes.append(ino(await r.reply())) }
    #expect(inodes.allSatisfy { $0 != nil && $0 == inodes[0] })
    #expect(s.caches.counts.withLock { $0.paths[s.path] } == 1)
  }

  @Test func treesAttributesReadsAndListingsAreAnsweredFromTheStore() async throws {
    let s = try Self.setUp("core-tree")
    let root = try #require(ino(await lookup(s.fs, Inode.root, s.path.baseName).reply()))
    let hello = await lookup(s.fs, root, "hello.txt").reply()
    let helloIno = try #require(ino(hello))
    let expected = Array(try Data(contentsOf: URL(fileURLWithPath: "\(s.tree)/hello.txt")))
    #expect(hello == .entry(ino: helloIno, size: expected.count, timeout: StoreFSOptions().entryTimeout))
    let open = Recorder()
    s.fs.open(open, ino: helloIno, flags: O_RDONLY)
    #expect(await open.reply() == .opened(keepCache: true, cacheDirectory: false))
    let write = Recorder()
    s.fs.open(write, ino: helloIno, flags: O_WRONLY)
    #expect(await write.reply() == .error(EROFS))
    let read = Recorder()
    s.fs.read(read, ino: helloIno, size: 4096, offset: 0)
    #expect(await read.reply() == .bytes(expected))
    let dir = Recorder()
    s.fs.opendir(dir, ino: root)
    #expect(await dir.reply() == .opened(keepCache: true, cacheDirectory: true))
    let list = Recorder()
    s.fs.readdir(list, ino: root, size: 4096, offset: 0, handle: 0)
    let names = try FileManager.default.contentsOfDirectory(atPath: s.tree).sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
    #expect(await list.reply() == .listing(names))
    // A missing name inside an immutable tree is cached as long as names are.
    #expect(await lookup(s.fs, root, "no-such-file").reply() == .entry(ino: 0, size: 0, timeout: StoreFSOptions().entryTimeout))
    #expect(await lookup(s.fs, helloIno, "x").reply() == .error(ENOTDIR))
  }

  @Test func aPartialFileFetchesOnlyTheChunksItsReadsCover() async throws {
    let s = try Self.setUp("core-partial", partial: true)
    let root = try #require(ino(await lookup(s.fs, Inode.root, s.path.baseName).reply()))
    #expect(s.store.isPartial(s.path))
    // The big file of `Tree.everyKind` (3 MiB and 3 bytes); found by its size.
    let list = Recorder()
    s.fs.readdir(list, ino: root, size: 65536, offset: 0, handle: 0)
    guard case .listing(let names) = await list.reply() else { Issue.record("no listing"); return }
    var big: (UInt64, String)?
    for name in names {
      if case .entry(let i, let size, _) = await lookup(s.fs, root, name).reply(), size == (3 << 20) + 3 { big = (i, name) }
    }
    let (bigIno, bigName) = try #require(big)
    #expect(s.caches.counts.withLock { $0.chunks } == 0, "lookups and listings fetch no chunk")
    let expected = Array(try Data(contentsOf: URL(fileURLWithPath: "\(s.tree)/\(bigName)")))
    let read = Recorder()
    s.fs.read(read, ino: bigIno, size: 4096, offset: 1 << 20)
    #expect(await read.reply() == .bytes(Array(expected[(1 << 20)..<((1 << 20) + 4096)])))
    let fetched = s.caches.counts.withLock { $0.chunkBytes }
    #expect(fetched > 0 && fetched <= 2 * s.store.configuration.chunking.maxSize, "\(fetched) bytes for a 4 KiB read")
    // Read again: nothing more is fetched.
    let again = Recorder()
    s.fs.read(again, ino: bigIno, size: 4096, offset: 1 << 20)
    #expect(await again.reply() == .bytes(Array(expected[(1 << 20)..<((1 << 20) + 4096)])))
    #expect(s.caches.counts.withLock { $0.chunkBytes } == fetched)
    // A chunk source that fails: the read fails with EIO, later.
    s.caches.chunkSource = nil
    let failing = Recorder()
    s.fs.read(failing, ino: bigIno, size: 4096, offset: 0)
    #expect(await failing.reply() == .error(EIO))
  }
}

/// What the fake materialiser throws: a reason, as a real cause would say it.
struct FakeFailure: Error, CustomStringConvertible {
  let description: String
  init(_ description: String) { self.description = description }
}
