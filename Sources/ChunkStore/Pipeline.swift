internal import CZstd
import Foundation
import NixFormats
import Synchronization
import Threads

#if canImport(Glibc)
  import Glibc
#endif

/// The worker side of an ingest: hash, dedup, compress, append to the leased pack.
final class ChunkPipeline: @unchecked Sendable {
  enum Stored {
    case inline(Codec, [UInt8])
    case pack(Codec, offset: UInt64, stored: Int)

    /// The bytes it takes in the store.
    var bytes: Int {
      switch self {
      case .inline(_, let data): data.count
      case .pack(_, _, let stored): stored
      }
    }
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
  let storePath: StorePath
  let level: Int32
  let inlineLimit: Int
  /// What the feeding thread and the workers share.
  struct Shared {
    var queue: [Batch] = []
    var queueHead = 0
    /// Emptied batch buffers, back from the workers for the feeding thread to fill again: fresh
    /// half-MiB allocations would come from (and go back to) the kernel, costing page faults.
    var spareBuffers: [[UInt8]] = []
    var inFlight = 0
    var stopping = false
    var firstError: ChunkStoreError?
    var resultSlots: [ChunkRef?] = []
    var written: [ChunkID: (size: Int, stored: Stored)] = [:]
    var claimed: Set<ChunkID> = []
    var existing: Set<ChunkID> = []
    var packEnd: UInt64 = 0
    var writebackStart: UInt64 = 0
    var queued: Int { queue.count - queueHead }
  }
  let shared = Locked(Shared())
  /// The pack this ingest appends to, leased on the first chunk that needs one.
  let lease = Mutex<ChunkStore.PackLease?>(nil)
  /// Workers still running: `finish` and `discard` wait for none.
  private let running = Locked(0)
  private let maxQueued: Int
  // Owned by the feeding thread.
  private(set) var jobCount = 0
  private var started = false

  init(store: ChunkStore, storePath: StorePath) {
    self.store = store
    self.storePath = storePath
    level = store.configuration.compressionLevel
    inlineLimit = store.configuration.inlineLimit
    maxQueued = 4 * max(1, store.configuration.ingestThreads)
  }

  var error: ChunkStoreError? { shared.withLock { $0.firstError } }
  var results: [ChunkRef?] { shared.withLock { $0.resultSlots } }

  private func startWorkers() {
    started = true
    for n in 0..<max(1, store.configuration.ingestThreads) {
      running.withLock { $0 += 1 }
      let t = Thread { [self] in
        worker()
        running.withLock { $0 -= 1 }
        running.broadcast()
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
    let maxQueued = maxQueued
    try shared.withLock(when: { $0.queued < maxQueued || $0.firstError != nil }) { (s) throws(ChunkStoreError) in
      if let e = s.firstError { throw e }
      s.resultSlots.append(contentsOf: repeatElement(nil, count: pending.jobs.count))
      // Moved, not copied: the worker empties the buffer in place for reuse.
      s.queue.append(pending)
      pending = Batch()
      if let spare = s.spareBuffers.popLast() { pending.bytes = spare }
      s.inFlight += 1
    }
    shared.signal()
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
    let maxQueued = maxQueued
    while true {
      var wasFull = false
      var failed = false
      // nil: stopping with nothing queued (`failed`: after a failure). One reference to the batch
      // only, so emptying its buffer below does not copy it.
      var batch: Batch? = shared.withLock(when: { $0.queued > 0 || $0.stopping }) { s in
        guard s.queued > 0 else {
          failed = s.firstError != nil
          return nil
        }
        wasFull = s.queued >= maxQueued
        var taken = Batch()
        swap(&taken, &s.queue[s.queueHead])
        s.queueHead += 1
        if s.queueHead > 1024 && s.queueHead * 2 > s.queue.count {
          s.queue.removeFirst(s.queueHead)
          s.queueHead = 0
        }
        return taken
      }
      guard batch != nil else {
        // Finishing: what this worker staged goes to the pack before `finish` returns.
        if !failed, let e = catching({ () throws(ChunkStoreError) in try writeStaged(staging) }) { fail(e) }
        return
      }
      // Only the feeding thread can be waiting for room; wake it only then.
      if wasFull { shared.broadcast() }
      let jobs = batch!.jobs
      let failure: ChunkStoreError? = batch!.bytes.withUnsafeBytes { all in
        catching { () throws(ChunkStoreError) in
          for job in jobs {
            let bytes = UnsafeRawBufferPointer(rebasing: all[job.start..<job.start + job.count])
            try process(job.index, bytes, cctx, staging)
          }
        }
      }
      batch!.bytes.removeAll(keepingCapacity: true)
      let wake = shared.withLock { s -> Bool in
        if s.spareBuffers.count <= maxQueued { s.spareBuffers.append(batch!.bytes) }
        if let failure, s.firstError == nil { s.firstError = failure }
        s.inFlight -= 1
        return s.inFlight == 0 || failure != nil
      }
      if wake { shared.broadcast() }
    }
  }

  private func catching(_ body: () throws(ChunkStoreError) -> Void) -> ChunkStoreError? {
    do { try body() } catch { return error }
    return nil
  }

  private func fail(_ e: ChunkStoreError) {
    shared.withLock { s in if s.firstError == nil { s.firstError = e } }
    shared.broadcast()
  }

  private func process(
    _ index: Int, _ bytes: UnsafeRawBufferPointer, _ cctx: OpaquePointer, _ staging: Staging
  ) throws(ChunkStoreError) {
    let id = ChunkID.of(bytes)
    let known: Bool = shared.withLock { s in
      s.resultSlots[index] = ChunkRef(id: id, size: UInt32(bytes.count))
      return !s.claimed.insert(id).inserted
    }
    if known { return }
    if bytes.count <= inlineLimit {
      // Inline chunks cost no pack space, so there is nothing to save by looking them up first:
      // the commit's INSERT OR IGNORE dedups them.
      let compressed = compress(bytes, level: level, context: cctx)
      let stored = (compressed == nil ? Codec.raw : .zstd, compressed ?? Array(bytes))
      shared.withLock { $0.written[id] = (bytes.count, .inline(stored.0, stored.1)) }
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
      shared.withLock { _ = $0.existing.insert(id) }
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
    let offset: UInt64 = shared.withLock { s in
      defer { s.packEnd += UInt64(staging.used) }
      return s.packEnd
    }
    if let e = pwriteFully(lease.fd, UnsafeRawBufferPointer(start: staging.base, count: staging.used), offset: offset) {
      throw .io(path: store.packPath(lease.id), operation: "write \(staging.used) bytes at \(offset)", errno: e)
    }
    let flush: (UInt64, UInt64)? = shared.withLock { s in
      for e in staging.entries {
        s.written[e.id] = (e.size, .pack(e.codec, offset: offset + UInt64(e.at), stored: e.stored))
      }
      guard s.packEnd - s.writebackStart >= 8 << 20 else { return nil }
      defer { s.writebackStart = s.packEnd }
      return (s.writebackStart, s.packEnd)
    }
    staging.used = 0
    staging.entries.removeAll(keepingCapacity: true)
    if let (from, to) = flush { startWriteback(lease.fd, offset: from, length: to - from) }
  }

  private func leasedPack() throws(ChunkStoreError) -> ChunkStore.PackLease {
    try lease.withLock { (lease) throws(ChunkStoreError) -> ChunkStore.PackLease in
      if let lease { return lease }
      let l = try store.leasePack()
      shared.withLock { s in
        s.packEnd = l.start
        s.writebackStart = l.start
      }
      lease = l
      return l
    }
  }

  /// Waits for the workers to finish every chunk and write what they staged, and stops them.
  func finish() throws(ChunkStoreError) {
    try flush()
    shared.withLock(when: { $0.inFlight == 0 }) { $0.stopping = true }
    shared.broadcast()
    if started { running.withLock(when: { $0 == 0 }) { _ in } }
    if let e = error { throw e }
  }

  /// Abort: stop the workers, cut the pack back, forget borrows.
  func discard() {
    pending = Batch()
    let storePath = storePath
    shared.withLock { s in
      s.stopping = true
      s.firstError = s.firstError ?? .ingestFinished(storePath: storePath.path)
      s.inFlight -= s.queued
      s.queueHead = s.queue.count
    }
    shared.broadcast()
    shared.withLock(when: { $0.inFlight == 0 }) { _ in }
    if started { running.withLock(when: { $0 == 0 }) { _ in } }
    store.giveBack(shared.withLock { s in
      defer { s.existing = [] }
      return s.existing
    })
    if let lease = lease.withLock({ l in defer { l = nil }; return l }) {
      _ = ftruncate(lease.fd, off_t(lease.start))
      store.returnPack(lease, end: lease.start)
    }
  }
}
