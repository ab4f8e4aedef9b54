internal import CZstd
import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// Ingests one store path from its uncompressed NAR, fed in pieces of any size.
///
/// `feed` parses the NAR, hashes it (NarHash), cuts each file with FastCDC and hashes multi-chunk
/// files whole; worker threads hash, dedup, compress and append each chunk to a pack leased by
/// this ingest alone. Nothing is visible until `commit`: it checks NarHash and NarSize, makes the
/// pack bytes durable (fdatasync), then records chunks, contents and the path in one SQLite
/// transaction. `abort` (or dropping the object, or a crash) leaves only pack bytes past the
/// committed length, which are cut off.
///
/// One thread at a time may call `feed`/`commit`/`abort`.
public final class Ingest: @unchecked Sendable {
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
    var hasher: NixHasher? = nil
    var content: ContentID? = nil
  }
  var files: [FileState] = []
  var inFile = false

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
    buffer = .allocate(byteCount: 2 * cdc.maxSize, alignment: 16)
    pipeline = ChunkPipeline(store: store, storePath: info.storePath)
  }

  deinit {
    if !finished { abortQuietly() }
    buffer.deallocate()
  }

  public var bytesFed: UInt64 { narHasher.byteCount }

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
      files.append(f)
      start = 0
      end = 0
      inFile = true
    case .data(let bytes):
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
        while end - start >= cdc.maxSize { try emit(final: false) }
      }
    case .endFile:
      while end > start { try emit(final: true) }
      let i = files.count - 1
      if let h = files[i].hasher { files[i].content = SHA256Digest(bytes: h.finalize().digest) }
      inFile = false
    }
  }

  /// Cuts the next chunk off the buffer and hands it to the workers.
  func emit(final: Bool) throws {
    let available = UnsafeRawBufferPointer(start: buffer.baseAddress! + start, count: end - start)
    let len = cdc.cut(available)
    let chunk = UnsafeRawBufferPointer(rebasing: available[0..<len])
    let i = files.count - 1
    // A file that is one chunk is named by that chunk's digest (the same SHA-256 of the same
    // bytes); only multi-chunk files need a second, whole-file hash.
    let single = files[i].jobCount == 0 && final && len == end - start
    if !single {
      if files[i].hasher == nil { files[i].hasher = NixHasher() }
      files[i].hasher!.update(chunk)
    }
    files[i].jobCount += 1
    start += len
    try pipeline.submit(Array(chunk))
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
      try pipeline.finish()
      let results = pipeline.results
      for i in files.indices where files[i].content == nil {
        guard let first = results[files[i].firstJob] else { throw ChunkStoreError.chunkMissing(chunk: emptyContent, content: emptyContent) }
        files[i].content = first.id
      }
      let nodes = tree.nodes { files[$0].content! }
      var chunks: [ContentID: [ChunkRef]] = [:]
      for f in files {
        chunks[f.content!] = (f.firstJob..<f.firstJob + f.jobCount).map { results[$0]! }
      }
      let manifest = Manifest(info: info, nodes: nodes, chunks: chunks)
      try pipeline.publish(manifest: manifest, fileCount: files.count)
      finished = true
      store.endIngesting(info.storePath)
      store.didCommit()
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

  let store: ChunkStore
  let storePath: String
  let cond = NSCondition()
  // Guarded by `cond`.
  /// Batches of (job index, chunk bytes): small files make many small chunks, and handing them
  /// over in batches keeps thread wake-ups per byte low.
  private var queue: [[(Int, [UInt8])]] = []
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
  private var pending: [(Int, [UInt8])] = []
  private var pendingBytes = 0

  func submit(_ bytes: [UInt8]) throws(ChunkStoreError) {
    pending.append((jobCount, bytes))
    pendingBytes += bytes.count
    jobCount += 1
    if pendingBytes >= 256 << 10 || pending.count >= 64 { try flush() }
  }

  private func flush() throws(ChunkStoreError) {
    guard !pending.isEmpty else { return }
    if !started { startWorkers() }
    cond.lock()
    defer { cond.unlock() }
    while queue.count - queueHead >= maxQueued && firstError == nil { cond.wait() }
    if let e = firstError { throw e }
    resultSlots.append(contentsOf: repeatElement(nil, count: pending.count))
    queue.append(pending)
    pending = []
    pendingBytes = 0
    inFlight += 1
    cond.signal()
  }

  private func worker() {
    guard let cctx = ZSTD_createCCtx() else { return }
    defer { ZSTD_freeCCtx(cctx) }
    while true {
      cond.lock()
      while queue.count == queueHead && !stopping { cond.wait() }
      if queue.count == queueHead {
        cond.unlock()
        return
      }
      let wasFull = queue.count - queueHead >= maxQueued
      let batch = queue[queueHead]
      queue[queueHead] = []
      queueHead += 1
      if queueHead > 1024 && queueHead * 2 > queue.count {
        queue.removeFirst(queueHead)
        queueHead = 0
      }
      // Only the feeding thread can be waiting for room; wake it only then.
      if wasFull { cond.broadcast() }
      cond.unlock()
      var failure: ChunkStoreError?
      do { for (index, bytes) in batch { try process(index, bytes, cctx) } } catch { failure = error }
      cond.lock()
      if let failure, firstError == nil { firstError = failure }
      inFlight -= 1
      if inFlight == 0 || failure != nil { cond.broadcast() }
      cond.unlock()
    }
  }

  private func process(_ index: Int, _ bytes: [UInt8], _ cctx: OpaquePointer) throws(ChunkStoreError) {
    let id = SHA256Digest.of(bytes)
    let known: Bool = cond.locked {
      resultSlots[index] = ChunkRef(id: id, size: UInt32(bytes.count))
      if claimed.contains(id) { return true }
      claimed.insert(id)
      return false
    }
    if known { return }
    let level = store.configuration.compressionLevel
    if bytes.count <= store.configuration.inlineLimit {
      // Inline chunks cost no pack space, so there is nothing to save by looking them up first:
      // the commit's INSERT OR IGNORE dedups them.
      let compressed = bytes.withUnsafeBytes { compress($0, level: level, context: cctx) }
      cond.locked { written[id] = (bytes.count, .inline(compressed == nil ? .raw : .zstd, compressed ?? bytes)) }
      return
    }
    // Borrow before looking so GC cannot delete the chunk between our look and our commit.
    let exists = try store.gcLock.read { () throws(ChunkStoreError) -> Bool in
      store.borrow(id)
      let found: Bool
      do {
        found = try store.withReader { db in try db.prepare("SELECT 1 FROM chunks WHERE digest = ?").bind(id).step() }
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
    let compressed = bytes.withUnsafeBytes { compress($0, level: level, context: cctx) }
    let codec: Codec = compressed == nil ? .raw : .zstd
    let data = compressed ?? bytes
    let lease = try leasedPack()
    let offset: UInt64 = cond.locked {
      defer { packEnd += UInt64(data.count) }
      return packEnd
    }
    if let e = data.withUnsafeBytes({ pwriteFully(lease.fd, $0, offset: offset) }) {
      throw .io(path: store.packPath(lease.id), operation: "write chunk \(id) at \(offset)", errno: e)
    }
    let flush: (UInt64, UInt64)? = cond.locked {
      written[id] = (bytes.count, .pack(codec, offset: offset, stored: data.count))
      guard packEnd - writebackStart >= 8 << 20 else { return nil }
      defer { writebackStart = packEnd }
      return (writebackStart, packEnd)
    }
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

  /// Waits for the workers to finish every chunk and stops them.
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
  func publish(manifest: Manifest, fileCount: Int) throws {
    if let lease, packEnd > lease.start, fdatasync(lease.fd) != 0 {
      throw ChunkStoreError.io(path: store.packPath(lease.id), operation: "fdatasync", errno: errno)
    }
    var duplicates: [(UInt64, Int)] = []
    var added: UInt64 = 0
    let info = manifest.info
    var multiplicity: [ContentID: (count: Int, size: UInt64)] = [:]
    for n in manifest.nodes {
      if case .regular(let c, let size, _) = n.kind { multiplicity[c, default: (0, size)].count += 1 }
    }
    try store.withWriter { db in
      try db.transaction {
        let existingPath = try db.prepare("SELECT state FROM paths WHERE store_path = ?").bind(info.storePath)
        if try existingPath.step() {
          if existingPath.int(0) == ChunkStore.PathState.complete.rawValue {
            throw ChunkStoreError.alreadyComplete(storePath: info.storePath)
          }
          try db.prepare("DELETE FROM paths WHERE store_path = ?").bind(info.storePath).run()
        }
        // Which contents are new: only their chunk lists are recorded and counted.
        // One upsert per content: a live content never has zero references, so coming back with
        // exactly our count means the row is new.
        var newContents: [(ContentID, Int64)] = []
        for (content, m) in multiplicity {
          let up = try db.prepare(
            """
            INSERT INTO contents(digest, size, refs) VALUES(?, ?, ?)
            ON CONFLICT(digest) DO UPDATE SET refs = refs + excluded.refs RETURNING id, refs
            """
          ).bind(content, m.size, m.count)
          guard try up.step() else { throw ChunkStoreError.chunkMissing(chunk: content, content: content) }
          if up.int(1) == Int64(m.count) { newContents.append((content, up.int(0))) }
          _ = try up.step()
        }
        // References each chunk gains: one per position in a new content's chunk list.
        var gained: [ChunkID: Int] = [:]
        for (content, _) in newContents {
          for ref in manifest.chunks[content] ?? [] { gained[ref.id, default: 0] += 1 }
        }
        // Chunks this ingest wrote go in with their final count; INSERT OR IGNORE because a
        // concurrent ingest may have committed the same chunk first.
        var rowOf: [ChunkID: Int64] = [:]
        let insertChunk = """
          INSERT OR IGNORE INTO chunks(digest, size, stored, codec, pack, offset, data, refs)
          VALUES(?, ?, ?, ?, ?, ?, ?, ?)
          """
        for (id, w) in written {
          let refs = gained[id] ?? 0
          switch w.stored {
          case .inline(let codec, let data):
            try db.prepare(insertChunk).bind(id, w.size, data.count, codec.rawValue, nil, nil, data, refs).run()
          case .pack(let codec, let offset, let stored):
            try db.prepare(insertChunk).bind(id, w.size, stored, codec.rawValue, lease!.id, offset, nil, refs).run()
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
        for (id, n) in gained {
          let s = try db.prepare("UPDATE chunks SET refs = refs + ? WHERE digest = ? RETURNING id").bind(n, id)
          guard try s.step() else { throw ChunkStoreError.chunkMissing(chunk: id, content: emptyContent) }
          rowOf[id] = s.int(0)
          _ = try s.step()
        }
        for (content, contentRow) in newContents {
          var offset: UInt64 = 0
          for ref in manifest.chunks[content] ?? [] {
            try db.prepare("INSERT INTO content_chunks(content, offset, chunk) VALUES(?, ?, ?)")
              .bind(contentRow, offset, rowOf[ref.id]!).run()
            offset += UInt64(ref.size)
          }
        }
        let t = now()
        try db.prepare(
          """
          INSERT INTO paths(store_path, state, nar_hash, nar_size, refs, deriver, sigs, ca, tree, files, file_bytes,
            registered, last_access) VALUES(?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
          """
        ).bind(
          info.storePath, info.narHash, info.narSize, info.references.joined(separator: " "), info.deriver,
          info.signatures.joined(separator: "\n"), info.ca, manifest.encodeTree(), fileCount, manifest.fileBytes, t, t
        ).run()
        if let lease {
          try db.prepare("UPDATE packs SET committed = max(committed, ?) WHERE id = ?").bind(packEnd, lease.id).run()
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
  }

  /// Abort: stop the workers, cut the pack back, forget borrows.
  func discard() {
    pending = []
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

extension NSCondition {
  func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    lock()
    defer { unlock() }
    return try body()
  }
}
