internal import CZstd
import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

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
  var written: [ChunkID: (size: Int, stored: Stored)] = [:]
  private var claimed: Set<ChunkID> = []
  var existing: Set<ChunkID> = []
  var packEnd: UInt64 = 0
  private var writebackStart: UInt64 = 0
  var lease: ChunkStore.PackLease?
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
    let id = ChunkID.of(bytes)
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
        found = try store.withReader { db in try db.hasPresentChunk(id) }
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
