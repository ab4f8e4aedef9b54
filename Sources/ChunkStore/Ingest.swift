internal import CZstd
import Foundation
import Threads
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// Ingests one store path from its uncompressed NAR, fed in pieces of any size.
///
/// `feed` parses the NAR, hashes it (NarHash), cuts each file with FastCDC and packs small files
/// together; worker threads hash, dedup, compress and append each chunk to a pack leased by this
/// ingest alone. Nothing is visible until `commit`: it checks NarHash and NarSize, makes the
/// pack bytes durable (fdatasync), then records chunks, contents and the path in one SQLite
/// transaction. `abort` (or dropping the object, or a crash) leaves only pack bytes past the
/// committed length, which are cut off.
///
/// One thread at a time may call `feed`/`commit`/`abort`.
/// An ingest is a `NARSink`: it takes the decompressed NAR as it arrives, and a restarted download
/// resets it.
public final class Ingest: NARSink, @unchecked Sendable {
  public let info: PathInfo
  let store: ChunkStore
  var reader: NARReader
  var narHasher = NixHasher()
  var tree = TreeBuilder()
  var pipeline: ChunkPipeline
  let cdc: FastCDC

  struct FileState {
    var size: UInt64
    var firstJob: Int
    var jobCount = 0
    var content: ContentID? = nil
    /// A small file packed into a shared chunk: which group, and where in it.
    var packed: (group: Int, skip: Int)? = nil
  }
  var files: [FileState] = []
  var inFile = false

  /// Small files go back to back into the current group, which becomes one chunk at about
  /// `groupBytes` (fewer index rows and worker jobs, better compression than one chunk each).
  /// 16 KiB: a cold read of one small file decompresses its whole group, and 64 KiB groups made
  /// that read 1.6x slower and stored no fewer bytes.
  let smallFileLimit: Int
  static let groupBytes = 16 << 10
  var group: [UInt8] = []
  /// Job index of each submitted group.
  var groupJobs: [Int] = []
  /// Small contents already packed by this ingest: a repeat is not packed twice.
  var packedContents: [ContentID: (group: Int, skip: Int)] = [:]

  /// The current file's bytes not yet cut into chunks: [start, end) of a 2*max buffer.
  let buffer: UnsafeMutableRawBufferPointer
  var start = 0
  var end = 0
  var finished = false

  init(store: ChunkStore, info: PathInfo) throws(ChunkStoreError) {
    self.store = store
    self.info = info
    reader = NARReader(totalSize: info.narSize)
    cdc = store.configuration.chunking
    smallFileLimit = store.configuration.smallFileLimit
    buffer = .allocate(byteCount: 2 * cdc.maxSize, alignment: 16)
    pipeline = ChunkPipeline(store: store, storePath: info.storePath)
  }

  deinit {
    if !finished { abortQuietly() }
    buffer.deallocate()
  }

  public var bytesFed: UInt64 { narHasher.byteCount }

  /// Every byte fed is SHA-256-hashed here (for NarHash), so a download feeding this ingest can
  /// use `writtenNARHash()` rather than hash the same bytes again (`NARSink`).
  public var computesNARHash: Bool { true }
  /// The SHA-256 of the bytes fed since the start or the last `reset()`.
  public func writtenNARHash() -> NixHash? { narHasher.finalize() }
  /// Every byte fed is parsed here (strictly, by `NARReader`): a download need not parse it too.
  public var parsesNAR: Bool { true }

  /// Takes the next piece of the NAR.
  public func feed(_ bytes: UnsafeRawBufferPointer) throws(ChunkStoreError) {
    guard !finished else { throw .ingestFinished(storePath: info.storePath.path) }
    if let e = pipeline.error { throw e }
    narHasher.update(bytes)
    do {
      try reader.feed(bytes) { event in try self.handle(event) }
    } catch let e as NARError {
      throw .nar(storePath: info.storePath.path, error: e)
    } catch let e as ChunkStoreError {
      throw e
    } catch {
      throw .index(path: store.indexPath, operation: "ingest", message: "\(error)")
    }
  }

  public func feed(_ bytes: [UInt8]) throws(ChunkStoreError) {
    do { try bytes.withUnsafeBytes { try feed($0) } } catch let e as ChunkStoreError { throw e } catch {
      preconditionFailure("feed throws only ChunkStoreError")
    }
  }

  func handle(_ event: NAREvent) throws {
    switch event {
    case .directory(let name): tree.directory(name)
    case .endDirectory: tree.endDirectory()
    case .symlink(let name, let target): tree.symlink(name, target: target)
    case .file(let name, let size, let executable, _):
      tree.file(name, index: files.count, size: size, executable: executable)
      var f = FileState(size: size, firstJob: pipeline.jobCount)
      if size == 0 { f.content = emptyContent }
      if size > 0 && size <= UInt64(smallFileLimit) { f.packed = (groupJobs.count, group.count) }
      files.append(f)
      start = 0
      end = 0
      inFile = true
    case .data(let bytes):
      if files[files.count - 1].packed != nil {
        group.append(contentsOf: bytes)
        return
      }
      var offset = 0
      while offset < bytes.count {
        if buffer.count - end < cdc.maxSize {
          // Compact: what is left is under max bytes, so a whole max-sized piece then fits.
          let live = end - start
          if live > 0 { memmove(buffer.baseAddress!, buffer.baseAddress! + start, live) }  // may overlap
          start = 0
          end = live
        }
        let n = min(buffer.count - end, bytes.count - offset)
        (buffer.baseAddress! + end).copyMemory(from: bytes.baseAddress! + offset, byteCount: n)
        end += n
        offset += n
        while end - start >= cdc.maxSize { try emit() }
      }
    case .endFile:
      let i = files.count - 1
      if case let (g, skip)? = files[i].packed {
        let content = group.withUnsafeBytes { ContentID.of(UnsafeRawBufferPointer(rebasing: $0[skip...])) }
        files[i].content = content
        if let earlier = packedContents[content] {
          group.removeLast(group.count - skip)
          files[i].packed = earlier
        } else {
          packedContents[content] = (g, skip)
        }
        if group.count >= Self.groupBytes { try submitGroup() }
      } else {
        while end > start { try emit() }
      }
      inFile = false
    }
  }

  /// Cuts the next chunk off the buffer and hands it to the workers.
  func emit() throws {
    let available = UnsafeRawBufferPointer(start: buffer.baseAddress! + start, count: end - start)
    let len = cdc.cut(available)
    let chunk = UnsafeRawBufferPointer(rebasing: available[0..<len])
    files[files.count - 1].jobCount += 1
    start += len
    try pipeline.submit(chunk)
  }

  /// Hands the current small-file group to the workers as one chunk.
  func submitGroup() throws {
    guard !group.isEmpty else { return }
    groupJobs.append(pipeline.jobCount)
    try group.withUnsafeBytes { try pipeline.submit($0) }
    group.removeAll(keepingCapacity: true)
  }

  /// Verifies NarHash and NarSize, makes the data durable and publishes the path atomically.
  @discardableResult
  public func commit() throws(ChunkStoreError) -> Manifest {
    guard !finished else { throw .ingestFinished(storePath: info.storePath.path) }
    do {
      do { try reader.finish() } catch let e as NARError { throw ChunkStoreError.nar(storePath: info.storePath.path, error: e) }
      if narHasher.byteCount != info.narSize {
        throw ChunkStoreError.narSizeMismatch(storePath: info.storePath.path, expected: info.narSize, actual: narHasher.byteCount)
      }
      let actual = narHasher.finalize()
      if actual != info.narHash {
        throw ChunkStoreError.narHashMismatch(storePath: info.storePath.path, expected: info.narHash.nix32, actual: actual.nix32)
      }
      try submitGroup()
      try pipeline.finish()
      let results = pipeline.results
      var chunks: [ContentID: [ChunkRef]] = [:]
      var slices: [ContentID: UInt32] = [:]
      for i in files.indices {
        let jobs = files[i].packed.map { [groupJobs[$0.group]] } ?? Array(files[i].firstJob..<files[i].firstJob + files[i].jobCount)
        let list = jobs.compactMap { results[$0] }
        guard list.count == jobs.count else { throw ChunkStoreError.chunkMissing(chunk: nil, content: files[i].content) }
        // Empty and packed files are named already; one chunk: the file's SHA-256 is its name.
        let content = files[i].content ?? (list.count == 1 ? ContentID(chunk: list[0].id) : .ofChunkList(list))
        files[i].content = content
        chunks[content] = list
        if let p = files[i].packed {
          slices[content] = Manifest.slice(skip: UInt64(p.skip), size: files[i].size, of: UInt64(list[0].size))
        }
      }
      let nodes = tree.nodes { files[$0].content! }
      let manifest = try pipeline.publish(
        manifest: Manifest(info: info, nodes: nodes, chunks: chunks, slices: slices), fileCount: files.count)
      finished = true
      store.endIngesting(info.storePath)
      store.didCommit(info.storePath)
      return manifest
    } catch {
      abortQuietly()
      if let e = error as? ChunkStoreError { throw e }
      throw .index(path: store.indexPath, operation: "commit", message: "\(error)")
    }
  }

  /// Drops everything written so far.
  public func abort() { abortQuietly() }

  /// The download restarts from byte 0 (a server ignored a Range request, or another
  /// substituter takes over): forget everything fed so far and expect the NAR from its start.
  public func reset() throws(ChunkStoreError) {
    guard !finished else { throw .ingestFinished(storePath: info.storePath.path) }
    pipeline.discard()
    pipeline = ChunkPipeline(store: store, storePath: info.storePath)
    reader = NARReader(totalSize: info.narSize)
    narHasher = NixHasher()
    tree = TreeBuilder()
    files = []
    group = []
    groupJobs = []
    packedContents = [:]
    start = 0
    end = 0
    inFile = false
  }

  /// `feed` under the name the cache client's `NARSink` uses, so the glue can declare
  /// `extension Ingest: NARSink {}`.
  public func write(_ bytes: UnsafeRawBufferPointer) throws(ChunkStoreError) { try feed(bytes) }

  func abortQuietly() {
    guard !finished else { return }
    finished = true
    pipeline.discard()
    store.endIngesting(info.storePath)
  }
}

let emptyContent = ContentID.of([UInt8]())

/// Why `ChunkStore.ingest(_:fetching:)` did not store a NAR: the fetch failed or refused it, or the
/// store could not take it. Either way nothing of it was kept.
public enum IngestFailure: Error, Sendable, CustomStringConvertible {
  case fetch(any Error)
  case store(ChunkStoreError)

  public var description: String {
    switch self {
    case .fetch(let e): "\(e)"
    case .store(let e): "\(e)"
    }
  }
}

extension ChunkStore {
  /// Starts ingesting `info.storePath` from its uncompressed NAR. Feed the bytes, then commit.
  /// `seen` is the path's state the caller just looked up (asked here when nil); a path that
  /// changed since is caught by the commit, which checks again inside its transaction.
  public func ingest(_ info: PathInfo, seen: LocalPath? = nil) throws(ChunkStoreError) -> Ingest {
    guard isWriter else { throw .index(path: indexPath, operation: "ingest", message: "store opened read-only") }
    let state: LocalPath
    if let seen { state = seen } else { state = try localState(of: info.storePath) }
    switch state {
    case .complete: throw .alreadyComplete(storePath: info.storePath.path)
    case .partial(let row):
      // A whole NAR replaces a partial path: its references go first (readers excluded), so the
      // commit starts from a row with none.
      _ = try evict(row: row, path: info.storePath.path, keepAsIncomplete: true)
    case .absent, .incomplete: break
    }
    try beginIngesting(info.storePath)
    do {
      return try Ingest(store: self, info: info)
    } catch {
      endIngesting(info.storePath)
      throw error
    }
  }

  public func ingest(_ narInfo: NarInfo) throws(ChunkStoreError) -> Ingest { try ingest(PathInfo(narInfo)) }

  /// Called by `Ingest.commit` after a successful commit.
  func didCommit(_ path: StorePath) {
    if let budget = configuration.maxStoredBytes {
      // The path just fetched is about to be read: never its own victim, even over budget.
      pin(path)
      defer { unpin(path) }
      do { _ = try collectGarbage(maxStoredBytes: budget) } catch { logger.error("online GC failed: \(error)") }
    }
  }

  func beginIngesting(_ path: StorePath) throws(ChunkStoreError) {
    try bookkeeping.withLock { (b) throws(ChunkStoreError) in
      if b.ingesting.contains(path) { throw .ingestInProgress(storePath: path.path) }
      b.ingesting.insert(path)
    }
  }
  func endIngesting(_ path: StorePath) { _ = bookkeeping.withLock { $0.ingesting.remove(path) } }

  func borrow(_ id: ChunkID) { bookkeeping.withLock { $0.borrowed[id, default: 0] += 1 } }
  func giveBack(_ ids: some Sequence<ChunkID>) {
    bookkeeping.withLock {
      for id in ids {
        let n = ($0.borrowed[id] ?? 1) - 1
        $0.borrowed[id] = n == 0 ? nil : n
      }
    }
  }
  func isBorrowed(_ id: ChunkID) -> Bool { bookkeeping.withLock { $0.borrowed[id] != nil } }

  /// The one way a NAR enters the store from a cache, for the node and the serve alike: `fetching`
  /// streams it into the ingest (the cache client parses and verifies it on the way); only once
  /// that returns is it committed, durable and visible, off the caller's thread (fsync and SQL);
  /// if anything throws, everything is discarded. Returns the manifest as stored.
  public func ingest(
    _ info: PathInfo, seen: LocalPath? = nil, fetching: (Ingest) async throws -> Void
  ) async throws(IngestFailure) -> Manifest {
    let ingest: Ingest
    do { ingest = try self.ingest(info, seen: seen) } catch { throw .store(error) }
    do { try await fetching(ingest) } catch {
      ingest.abort()
      throw .fetch(error)
    }
    do {
      return try await storeExecutor.run { try ingest.commit() }
    } catch {
      ingest.abort()
      throw .store(error as? ChunkStoreError ?? .index(path: indexPath, operation: "commit", message: "\(error)"))
    }
  }
}
