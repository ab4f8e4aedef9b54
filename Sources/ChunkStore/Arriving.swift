internal import CZstd
import Foundation
import NixFormats
import Synchronization
import Threads

#if canImport(Glibc)
  import Glibc
#endif

/// Verified chunks on their way to a pack: readable at once, written in batches off the read path.
final class ArrivingChunks: Sendable {
  struct Chunk: Sendable {
    let raw: [UInt8]
    /// What goes into the pack: the zstd frame as it came, or the raw bytes.
    let stored: [UInt8]
    let codec: Codec
  }
  private let state = Mutex<(chunks: [ChunkID: Chunk], scheduled: Bool)>(([:], false))

  func bytes(_ id: ChunkID) -> [UInt8]? { state.withLock { $0.chunks[id]?.raw } }

  /// Adds a chunk; true when no write is scheduled yet (the caller schedules one).
  func add(_ id: ChunkID, _ chunk: Chunk) -> Bool {
    state.withLock { s in
      s.chunks[id] = chunk
      defer { s.scheduled = true }
      return !s.scheduled
    }
  }

  /// What to write now; an empty answer ends the scheduled write.
  func batch(limit: Int) -> [(ChunkID, Chunk)] {
    state.withLock { s in
      var out: [(ChunkID, Chunk)] = []
      var bytes = 0
      for (id, c) in s.chunks where bytes < limit {
        out.append((id, c))
        bytes += c.stored.count
      }
      if out.isEmpty { s.scheduled = false }
      return out
    }
  }

  func written(_ ids: [ChunkID]) { state.withLock { s in for id in ids { s.chunks[id] = nil } } }
}

extension ChunkStore {
  /// Checks fetched bytes against the chunk they were asked for (digest, size) and, if they are
  /// it, makes them readable at once and schedules their write to a pack. Packed small files in
  /// the chunk are checked against their names too. Returns the uncompressed bytes.
  @discardableResult
  public func accept(_ id: ChunkID, size: Int, zstd: Bool, bytes: [UInt8], source: String) throws(ChunkStoreError) -> [UInt8] {
    func refuse(_ why: String) -> ChunkStoreError { .chunkRejected(chunk: id, source: source, reason: why) }
    let raw: [UInt8]
    if zstd {
      guard let r = decompress(bytes, rawSize: size) else { throw refuse("not one zstd frame of \(size) bytes") }
      raw = r
    } else {
      raw = bytes
    }
    guard raw.count == size else { throw refuse("\(raw.count) bytes, expected \(size)") }
    guard ChunkID.of(raw) == id else { throw refuse("its bytes do not hash to its name") }
    for slice in try slices(in: id) {
      let fits = slice.skip + slice.size <= raw.count
      let got = fits ? raw.withUnsafeBytes { ContentID.of(UnsafeRawBufferPointer(rebasing: $0[slice.skip..<slice.skip + slice.size])) } : nil
      guard got == slice.content else { throw refuse("the packed file \(slice.content) in it does not match its name") }
    }
    // Small or incompressible chunks are stored as they are.
    let stored = zstd && bytes.count < raw.count - raw.count / 32 ? Chunk(raw: raw, stored: bytes, codec: .zstd) : Chunk(raw: raw, stored: raw, codec: .raw)
    chunkCache.put(id, raw)
    if arriving.add(id, stored) {
      blockingPool.submit { [self] _ in writeArriving() }
    }
    return raw
  }

  private typealias Chunk = ArrivingChunks.Chunk

  /// Packed small files held in chunk `id`, by what the index says of them.
  func slices(in id: ChunkID) throws(ChunkStoreError) -> [(content: ContentID, skip: Int, size: Int)] {
    try wrap("slices") {
      try withReader { db in try db.slices(in: id) }
    }
  }

  /// Writes arriving chunks to a pack, a batch at a time, until none are left. Only rows still
  /// absent take them (GC may have dropped the path since); other bytes are punched out again.
  func writeArriving() {
    while true {
      let batch = arriving.batch(limit: 8 << 20)
      if batch.isEmpty { return }
      do {
        try writeBatch(batch)
      } catch {
        // They stay readable in memory and absent in the index: a later read fetches them again.
        logger.error("cannot store fetched chunks: \(error)")
      }
      arriving.written(batch.map(\.0))
      if let budget = configuration.maxStoredBytes {
        do { _ = try collectGarbage(maxStoredBytes: budget) } catch { logger.error("online GC failed: \(error)") }
      }
    }
  }

  private func writeBatch(_ batch: [(ChunkID, Chunk)]) throws(ChunkStoreError) {
    try gcLock.read { () throws(ChunkStoreError) in
      let lease = try leasePack()
      var end = lease.start
      var placed: [(id: ChunkID, chunk: Chunk, offset: UInt64?)] = []
      for (id, c) in batch {
        if c.stored.count <= configuration.inlineLimit {
          placed.append((id, c, nil))
          continue
        }
        if let e = c.stored.withUnsafeBytes({ pwriteFully(lease.fd, $0, offset: end) }) {
          returnPack(lease, end: end)
          throw .io(path: packPath(lease.id), operation: "write \(c.stored.count) bytes at \(end)", errno: e)
        }
        placed.append((id, c, end))
        end += UInt64(c.stored.count)
      }
      if end > lease.start && fdatasync(lease.fd) != 0 {
        let e = errno
        _ = ftruncate(lease.fd, off_t(lease.start))
        returnPack(lease, end: lease.start)
        throw .io(path: packPath(lease.id), operation: "fdatasync", errno: e)
      }
      var unused: [(UInt64, UInt64)] = []
      var added: UInt64 = 0
      do {
        try withWriter { db in
          try db.transaction {
            let fill = try db.fillAbsentChunkStatement()
            for p in placed {
              fill.again()
              fill.set(1, p.chunk.stored.count)
              fill.set(2, p.chunk.codec.rawValue)
              if let offset = p.offset {
                fill.set(3, lease.id)
                fill.set(4, offset)
                fill.setNull(5)
              } else {
                fill.setNull(3)
                fill.set(4, 0)
                fill.set(5, blob: p.chunk.stored)
              }
              fill.set(6, p.id)
              try fill.run()
              if db.changes == 1 {
                added += UInt64(p.chunk.stored.count)
              } else if let offset = p.offset {
                unused.append((offset, UInt64(p.chunk.stored.count)))
              }
            }
            if end > lease.start {
              try db.commitPack(lease.id, upTo: end)
            }
            // Checked in `accept` before they were readable.
            let verified = try db.deleteSlicesOfChunkStatement()
            for p in placed {
              verified.again()
              verified.set(1, p.id)
              try verified.run()
            }
          }
        }
      } catch {
        _ = ftruncate(lease.fd, off_t(lease.start))
        returnPack(lease, end: lease.start)
        throw error as? ChunkStoreError ?? .index(path: indexPath, operation: "store fetched chunks", message: "\(error)")
      }
      adjustStored(adding: added)
      for (offset, len) in unused { punchHole(lease.fd, offset: offset, length: len) }
      returnPack(lease, end: end)
    }
  }
}
