internal import CZstd
import Foundation
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
  let expectedHash: NixHash
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
    do { expectedHash = try NixHash(parsing: info.narHash) } catch {
      throw .narHashMismatch(storePath: info.storePath, expected: info.narHash, actual: "(unparsable expected hash)")
    }
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

  /// Takes the next piece of the NAR.
  public func feed(_ bytes: UnsafeRawBufferPointer) throws(ChunkStoreError) {
    guard !finished else { throw .ingestFinished(storePath: info.storePath) }
    if let e = pipeline.error { throw e }
    narHasher.update(bytes)
    do {
      try reader.feed(bytes) { event in try self.handle(event) }
    } catch let e as NARError {
      throw .nar(storePath: info.storePath, error: e)
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
        let content = group.withUnsafeBytes { SHA256Digest.of(UnsafeRawBufferPointer(rebasing: $0[skip...])) }
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
    guard !finished else { throw .ingestFinished(storePath: info.storePath) }
    do {
      do { try reader.finish() } catch let e as NARError { throw ChunkStoreError.nar(storePath: info.storePath, error: e) }
      if narHasher.byteCount != info.narSize {
        throw ChunkStoreError.narSizeMismatch(storePath: info.storePath, expected: info.narSize, actual: narHasher.byteCount)
      }
      let actual = narHasher.finalize()
      if actual != expectedHash {
        throw ChunkStoreError.narHashMismatch(storePath: info.storePath, expected: expectedHash.nix32, actual: actual.nix32)
      }
      try submitGroup()
      try pipeline.finish()
      let results = pipeline.results
      var chunks: [ContentID: [ChunkRef]] = [:]
      var slices: [ContentID: UInt32] = [:]
      for i in files.indices {
        let jobs = files[i].packed.map { [groupJobs[$0.group]] } ?? Array(files[i].firstJob..<files[i].firstJob + files[i].jobCount)
        let list = jobs.compactMap { results[$0] }
        guard list.count == jobs.count else { throw ChunkStoreError.chunkMissing(chunk: emptyContent, content: emptyContent) }
        // Empty and packed files are named already; one chunk: the file's SHA-256 is its name.
        let content = files[i].content ?? (list.count == 1 ? list[0].id : .ofChunkList(list))
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
    guard !finished else { throw .ingestFinished(storePath: info.storePath) }
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

let emptyContent = SHA256Digest.of([UInt8]())

/// The worker side of an ingest: hash, dedup, compress, append to the leased pack.
final class ChunkPipeline: @unchecked Sendable {
  enum Stored {
    case inline(Codec, [UInt8])
    case pack(Codec, offset: UInt64, stored: Int)
  }

  /// Chunks handed over together: their bytes back to back in one allocation, since small files
  /// make many small chunks and both an allocation and a thread wake-up per chunk cost more than
  /// hashing one.
  struct Batch {
    var bytes: [UInt8] = []
    /// (job index, start in `bytes`, length).
    var jobs: [(index: Int, start: Int, count: Int)] = []
  }

  let store: ChunkStore
  let storePath: String
  let level: Int32
  let inlineLimit: Int
  let cond = NSCondition()
  // Guarded by `cond`.
  private var queue: [Batch] = []
  /// Emptied batch buffers, back from the workers for the feeding thread to fill again: fresh
  /// half-MiB allocations would come from (and go back to) the kernel, costing page faults.
  private var spareBuffers: [[UInt8]] = []
  private var queueHead = 0
  private var inFlight = 0
  private var stopping = false
  private var firstError: ChunkStoreError?
  private(set) var jobCount = 0
  private var resultSlots: [ChunkRef?] = []
  private var written: [ChunkID: (size: Int, stored: Stored)] = [:]
  private var claimed: Set<ChunkID> = []
  private var existing: Set<ChunkID> = []
  private var packEnd: UInt64 = 0
  private var writebackStart: UInt64 = 0
  private var lease: ChunkStore.PackLease?
  private let leaseLock = NSLock()
  private let group = DispatchGroup()
  private var started = false
  private let maxQueued: Int

  init(store: ChunkStore, storePath: String) {
    self.store = store
    self.storePath = storePath
    level = store.configuration.compressionLevel
    inlineLimit = store.configuration.inlineLimit
    maxQueued = 4 * max(1, store.configuration.ingestThreads)
  }

  var error: ChunkStoreError? { cond.lock(); defer { cond.unlock() }; return firstError }
  var results: [ChunkRef?] { cond.lock(); defer { cond.unlock() }; return resultSlots }

  private func startWorkers() {
    started = true
    for n in 0..<max(1, store.configuration.ingestThreads) {
      group.enter()
      let t = Thread { [self] in
        worker()
        group.leave()
      }
      t.name = "nixfs-ingest-\(n)"
      t.start()
    }
  }

  // Owned by the feeding thread.
  private var pending = Batch()

  func submit(_ chunk: UnsafeRawBufferPointer) throws(ChunkStoreError) {
    if pending.jobs.isEmpty {
      // A no-op when the buffer is a spare from the workers.
      pending.bytes.reserveCapacity(Self.batchBytes + store.configuration.chunking.maxSize)
    }
    pending.jobs.append((jobCount, pending.bytes.count, chunk.count))
    pending.bytes.append(contentsOf: chunk)
    jobCount += 1
    if pending.bytes.count >= Self.batchBytes || pending.jobs.count >= 128 { try flush() }
  }

  static let batchBytes = 256 << 10

  private func flush() throws(ChunkStoreError) {
    guard !pending.jobs.isEmpty else { return }
    if !started { startWorkers() }
    cond.lock()
    defer { cond.unlock() }
    while queue.count - queueHead >= maxQueued && firstError == nil { cond.wait() }
    if let e = firstError { throw e }
    resultSlots.append(contentsOf: repeatElement(nil, count: pending.jobs.count))
    queue.append(pending)
    pending = Batch()
    if let spare = spareBuffers.popLast() { pending.bytes = spare }
    inFlight += 1
    cond.signal()
  }

  /// A worker's pack bytes not yet written: chunks are compressed straight into it and go to the
  /// pack in one pwrite of about a MiB, instead of one small, page-unaligned write per chunk.
  final class Staging {
    let capacity: Int
    let base: UnsafeMutableRawPointer
    var used = 0
    /// (chunk, raw size, codec, offset in the staging buffer, stored size).
    var entries: [(id: ChunkID, size: Int, codec: Codec, at: Int, stored: Int)] = []
    static let flushAt = 1 << 20

    init(maxChunk: Int) {
      capacity = Self.flushAt + ZSTD_compressBound(maxChunk)
      base = .allocate(byteCount: capacity, alignment: 4096)
    }
    deinit { base.deallocate() }
  }

  private func worker() {
    guard let cctx = ZSTD_createCCtx() else { return }
    defer { ZSTD_freeCCtx(cctx) }
    // A small-file group may be larger than the FastCDC maximum (with a small maximum or a large
    // small-file limit): room for whichever is bigger, raw or compressed.
    let largest = store.largestChunk
    let staging = Staging(maxChunk: largest)
    while true {
      cond.lock()
      while queue.count == queueHead && !stopping { cond.wait() }
      if queue.count == queueHead {
        let failed = firstError != nil
        cond.unlock()
        // Finishing: what this worker staged goes to the pack before `finish` returns.
        if !failed, let e = catching({ () throws(ChunkStoreError) in try writeStaged(staging) }) { fail(e) }
        return
      }
      let wasFull = queue.count - queueHead >= maxQueued
      var batch = queue[queueHead]
      queue[queueHead] = Batch()
      queueHead += 1
      if queueHead > 1024 && queueHead * 2 > queue.count {
        queue.removeFirst(queueHead)
        queueHead = 0
      }
      // Only the feeding thread can be waiting for room; wake it only then.
      if wasFull { cond.broadcast() }
      cond.unlock()
      let failure: ChunkStoreError? = batch.bytes.withUnsafeBytes { all in
        catching { () throws(ChunkStoreError) in
          for job in batch.jobs {
            let bytes = UnsafeRawBufferPointer(rebasing: all[job.start..<job.start + job.count])
            try process(job.index, bytes, cctx, staging)
          }
        }
      }
      batch.bytes.removeAll(keepingCapacity: true)
      cond.lock()
      if spareBuffers.count <= maxQueued { spareBuffers.append(batch.bytes) }
      if let failure, firstError == nil { firstError = failure }
      inFlight -= 1
      if inFlight == 0 || failure != nil { cond.broadcast() }
      cond.unlock()
    }
  }

  private func catching(_ body: () throws(ChunkStoreError) -> Void) -> ChunkStoreError? {
    do { try body() } catch { return error }
    return nil
  }

  private func fail(_ e: ChunkStoreError) {
    cond.locked {
      if firstError == nil { firstError = e }
      cond.broadcast()
    }
  }

  private func process(
    _ index: Int, _ bytes: UnsafeRawBufferPointer, _ cctx: OpaquePointer, _ staging: Staging
  ) throws(ChunkStoreError) {
    let id = SHA256Digest.of(bytes)
    let known: Bool = cond.locked {
      resultSlots[index] = ChunkRef(id: id, size: UInt32(bytes.count))
      return !claimed.insert(id).inserted
    }
    if known { return }
    if bytes.count <= inlineLimit {
      // Inline chunks cost no pack space, so there is nothing to save by looking them up first:
      // the commit's INSERT OR IGNORE dedups them.
      let compressed = compress(bytes, level: level, context: cctx)
      let stored = (compressed == nil ? Codec.raw : .zstd, compressed ?? Array(bytes))
      cond.locked { written[id] = (bytes.count, .inline(stored.0, stored.1)) }
      return
    }
    // Borrow before looking so GC cannot delete the chunk between our look and our commit.
    let exists = try store.gcLock.read { () throws(ChunkStoreError) -> Bool in
      store.borrow(id)
      let found: Bool
      do {
        found = try store.withReader { db in try db.prepare("SELECT 1 FROM chunks WHERE digest = ? AND codec != 2").bind(id).step() }
      } catch {
        store.giveBack([id])
        throw error as? ChunkStoreError ?? .index(path: store.indexPath, operation: "dedup", message: "\(error)")
      }
      if !found { store.giveBack([id]) }
      return found
    }
    if exists {
      cond.locked { _ = existing.insert(id) }
      return
    }
    // Compressed straight into the staging buffer; kept raw when that saves under 1/32.
    let at = staging.used
    let room = staging.capacity - at
    let r = ZSTD_compressCCtx(cctx, staging.base + at, room, bytes.baseAddress, bytes.count, level)
    let codec: Codec
    let stored: Int
    if ZSTD_isError(r) == 0 && r < bytes.count - bytes.count / 32 {
      (codec, stored) = (.zstd, r)
    } else {
      (staging.base + at).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
      (codec, stored) = (.raw, bytes.count)
    }
    staging.used += stored
    staging.entries.append((id, bytes.count, codec, at, stored))
    if staging.used >= Staging.flushAt { try writeStaged(staging) }
  }

  /// Appends a worker's staged chunks to the pack at a range reserved for them.
  private func writeStaged(_ staging: Staging) throws(ChunkStoreError) {
    guard staging.used > 0 else { return }
    let lease = try leasedPack()
    let offset: UInt64 = cond.locked {
      defer { packEnd += UInt64(staging.used) }
      return packEnd
    }
    if let e = pwriteFully(lease.fd, UnsafeRawBufferPointer(start: staging.base, count: staging.used), offset: offset) {
      throw .io(path: store.packPath(lease.id), operation: "write \(staging.used) bytes at \(offset)", errno: e)
    }
    let flush: (UInt64, UInt64)? = cond.locked {
      for e in staging.entries {
        written[e.id] = (e.size, .pack(e.codec, offset: offset + UInt64(e.at), stored: e.stored))
      }
      guard packEnd - writebackStart >= 8 << 20 else { return nil }
      defer { writebackStart = packEnd }
      return (writebackStart, packEnd)
    }
    staging.used = 0
    staging.entries.removeAll(keepingCapacity: true)
    if let (from, to) = flush { startWriteback(lease.fd, offset: from, length: to - from) }
  }

  private func leasedPack() throws(ChunkStoreError) -> ChunkStore.PackLease {
    try leaseLock.locked { () throws(ChunkStoreError) -> ChunkStore.PackLease in
      if let lease { return lease }
      let l = try store.leasePack()
      cond.locked {
        packEnd = l.start
        writebackStart = l.start
      }
      lease = l
      return l
    }
  }

  /// Waits for the workers to finish every chunk and write what they staged, and stops them.
  func finish() throws(ChunkStoreError) {
    try flush()
    cond.lock()
    while inFlight > 0 { cond.wait() }
    stopping = true
    cond.broadcast()
    cond.unlock()
    if started { group.wait() }
    if let e = error { throw e }
  }

  /// The commit: durable data first, then one index transaction.
  /// Returns the manifest as stored: a small file the store already held keeps the shared chunk
  /// it was packed in first, not the one this ingest packed it in.
  func publish(manifest: Manifest, fileCount: Int) throws -> Manifest {
    var stored = manifest
    // The pack's fdatasync runs while the index rows go in; the transaction waits for it before
    // COMMIT, so the index still never points at bytes that are not durable.
    let sync = lease.flatMap { packEnd > $0.start ? PendingSync(fd: $0.fd) : nil }
    defer { _ = sync?.wait() }
    var duplicates: [(UInt64, Int)] = []
    var added: UInt64 = 0
    let info = manifest.info
    let multiplicity = manifest.multiplicity
    try store.withWriter { db in
      try db.transaction {
        let existingPath = try db.prepare("SELECT state FROM paths WHERE store_path = ?").bind(info.storePath)
        if try existingPath.step() {
          // A complete path, or a partial one registered while this ingest ran (it holds references).
          if existingPath.int(0) != ChunkStore.PathState.incomplete.rawValue {
            throw ChunkStoreError.alreadyComplete(storePath: info.storePath)
          }
          try db.prepare("DELETE FROM paths WHERE store_path = ?").bind(info.storePath).run()
        }
        // Statements are prepared once and bound by type, and rows go in in digest order (the
        // digest indexes then grow at neighbouring leaves): this matters for paths of many small
        // files, where the commit is most of the ingest.
        //
        // Which contents are new: only their chunk lists are recorded and counted. A live content
        // never has zero references (GC deletes it with its last one), so an existing row is a
        // complete one and only gains our references. (Plain statements: RETURNING would put
        // every execution through a temporary table.)
        var newContents: [(ContentID, Int64)] = []
        var knownSingles: [ContentID] = []
        let insertContent = try db.prepare("INSERT OR IGNORE INTO contents(digest, size, refs, skip) VALUES(?, ?, ?, ?)")
        let addContentRefs = try db.prepare("UPDATE contents SET refs = refs + ? WHERE digest = ?")
        for (content, m) in multiplicity.sorted(by: { $0.key < $1.key }) {
          insertContent.again()
          insertContent.set(1, content)
          insertContent.set(2, m.size)
          insertContent.set(3, m.count)
          insertContent.set(4, Int(manifest.slices[content] ?? 0))
          try insertContent.run()
          if db.changes == 1 {
            newContents.append((content, db.lastInsertRowID))
          } else {
            addContentRefs.again()
            addContentRefs.set(1, m.count)
            addContentRefs.set(2, content)
            try addContentRefs.run()
            guard db.changes == 1 else { throw ChunkStoreError.chunkMissing(chunk: content, content: content) }
            // A same-named file of several chunks has the same list; one chunk may have been
            // stored (or packed) otherwise.
            if manifest.chunks[content]?.count == 1 { knownSingles.append(content) }
          }
        }
        // References each chunk gains: one per position in a new content's chunk list.
        var gained: [ChunkID: Int] = [:]
        gained.reserveCapacity(written.count)
        for (content, _) in newContents {
          for ref in manifest.chunks[content] ?? [] { gained[ref.id, default: 0] += 1 }
        }
        // Chunks this ingest wrote go in with their final count; INSERT OR IGNORE because a
        // concurrent ingest may have committed the same chunk first.
        var rowOf: [ChunkID: Int64] = [:]
        rowOf.reserveCapacity(gained.count)
        // Chunks a partial path knows but lacks, which this ingest wrote: their rows get the bytes
        // (and keep their references; new ones come below like any deduplicated chunk's).
        var filled: Set<ChunkID> = []
        if try db.prepare("SELECT 1 FROM chunks WHERE codec = 2 LIMIT 1").step() {
          let fill = try db.prepare(
            "UPDATE chunks SET stored = ?, codec = ?, pack = ?, offset = ?, data = ? WHERE digest = ? AND codec = 2")
          for (id, w) in written.sorted(by: { $0.key < $1.key }) {
            fill.again()
            switch w.stored {
            case .inline(let codec, let data):
              fill.set(1, data.count)
              fill.set(2, codec.rawValue)
              fill.setNull(3)
              fill.set(4, 0)
              fill.set(5, blob: data)
            case .pack(let codec, let offset, let stored):
              fill.set(1, stored)
              fill.set(2, codec.rawValue)
              fill.set(3, lease!.id)
              fill.set(4, offset)
              fill.setNull(5)
            }
            fill.set(6, id)
            try fill.run()
            guard db.changes == 1 else { continue }
            filled.insert(id)
            switch w.stored {
            case .inline(_, let data): added += UInt64(data.count)
            case .pack(_, _, let stored): added += UInt64(stored)
            }
          }
        }
        let insertChunk = try db.prepare(
          """
          INSERT OR IGNORE INTO chunks(digest, size, stored, codec, pack, offset, data, refs)
          VALUES(?, ?, ?, ?, ?, ?, ?, ?)
          """
        )
        for (id, w) in written.sorted(by: { $0.key < $1.key }) where !filled.contains(id) {
          guard let refs = gained[id] else {
            // Nothing new uses it: a small-file group whose files were all in the store already.
            if case .pack(_, let offset, let stored) = w.stored { duplicates.append((offset, stored)) }
            continue
          }
          insertChunk.again()
          insertChunk.set(1, id)
          insertChunk.set(2, w.size)
          insertChunk.set(8, refs)
          switch w.stored {
          case .inline(let codec, let data):
            insertChunk.set(3, data.count)
            insertChunk.set(4, codec.rawValue)
            insertChunk.setNull(5)
            insertChunk.setNull(6)
            insertChunk.set(7, blob: data)
            try insertChunk.run()
          case .pack(let codec, let offset, let stored):
            insertChunk.set(3, stored)
            insertChunk.set(4, codec.rawValue)
            insertChunk.set(5, lease!.id)
            insertChunk.set(6, offset)
            insertChunk.setNull(7)
            try insertChunk.run()
            if db.changes == 0 { duplicates.append((offset, stored)) }
          }
          if db.changes == 1 {
            rowOf[id] = db.lastInsertRowID
            gained[id] = nil
            switch w.stored {
            case .inline(_, let data): added += UInt64(data.count)
            case .pack(_, _, let stored): added += UInt64(stored)
            }
          }
        }
        // Chunks that were already there (deduplicated) gain references.
        let addRefs = try db.prepare("UPDATE chunks SET refs = refs + ? WHERE digest = ? RETURNING id")
        for (id, n) in gained.sorted(by: { $0.key < $1.key }) {
          addRefs.again()
          addRefs.set(1, n)
          addRefs.set(2, id)
          guard try addRefs.step() else { throw ChunkStoreError.chunkMissing(chunk: id, content: emptyContent) }
          rowOf[id] = addRefs.int(0)
          _ = try addRefs.step()
        }
        try ChunkStore.insertChunkLists(db, newContents, of: manifest, rows: rowOf)
        // Their layouts as stored: the rows were there before this transaction, and no other
        // writer can remove them while it runs.
        for content in knownSingles {
          let layout = try store.layout(content)
          stored.chunks[content] = layout.refs
          stored.slices[content] = layout.slice
        }
        try ChunkStore.insertPath(db, manifest, state: .complete, files: fileCount)
        if let lease {
          try db.prepare("UPDATE packs SET committed = max(committed, ?) WHERE id = ?").bind(packEnd, lease.id).run()
          if let e = sync?.wait(), e != 0 {
            throw ChunkStoreError.io(path: store.packPath(lease.id), operation: "fdatasync", errno: e)
          }
        }
      }
    }
    // Committed: the rest is housekeeping a crash may skip (fsck --repair punches dead ranges).
    store.adjustStored(adding: added)
    store.giveBack(existing)
    existing = []
    if let lease {
      for (offset, len) in duplicates { punchHole(lease.fd, offset: offset, length: UInt64(len)) }
      store.returnPack(lease, end: packEnd)
      self.lease = nil
    }
    return stored
  }

  /// Abort: stop the workers, cut the pack back, forget borrows.
  func discard() {
    pending = Batch()
    cond.lock()
    stopping = true
    firstError = firstError ?? .ingestFinished(storePath: storePath)
    inFlight -= queue.count - queueHead
    queueHead = queue.count
    cond.broadcast()
    while inFlight > 0 { cond.wait() }
    cond.unlock()
    if started { group.wait() }
    store.giveBack(existing)
    existing = []
    if let lease {
      _ = ftruncate(lease.fd, off_t(lease.start))
      store.returnPack(lease, end: lease.start)
      self.lease = nil
    }
  }
}

/// An fdatasync running on another thread.
final class PendingSync: @unchecked Sendable {
  private let done = DispatchSemaphore(value: 0)
  // Written before `done` is signalled, read after it is waited for.
  private var error: Int32 = 0
  private var waited = false

  init(fd: Int32) {
    DispatchQueue.global(qos: .userInitiated).async { [self] in
      if fdatasync(fd) != 0 { error = errno }
      done.signal()
    }
  }

  /// Waits (once; later calls return at once) and returns the errno, 0 on success. One thread only.
  func wait() -> Int32 {
    if !waited {
      done.wait()
      waited = true
    }
    return error
  }
}

extension NSCondition {
  func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    lock()
    defer { unlock() }
    return try body()
  }
}

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
  /// The one way a NAR enters the store from a cache, for the node and the serve alike: `fetching`
  /// streams it into the ingest (the cache client parses and verifies it on the way); only once
  /// that returns is it committed, durable and visible, off the caller's thread (fsync and SQL);
  /// if anything throws, everything is discarded. Returns the manifest as stored.
  public func ingest(_ info: PathInfo, fetching: (Ingest) async throws -> Void) async throws(IngestFailure) -> Manifest {
    let ingest: Ingest
    do { ingest = try self.ingest(info) } catch { throw .store(error) }
    do { try await fetching(ingest) } catch {
      ingest.abort()
      throw .fetch(error)
    }
    do {
      return try await blockingWork { try ingest.commit() }
    } catch {
      ingest.abort()
      throw .store(error as? ChunkStoreError ?? .index(path: indexPath, operation: "commit", message: "\(error)"))
    }
  }
}
