import Foundation

#if canImport(Glibc)
  import Glibc
#endif

extension ChunkStore {
  /// Undo a crashed writer: cut packs back to their committed length, delete pack files the
  /// index does not know, and drop chunks no content references.
  /// Runs in `init`, before the store is shared, on the writer connection `db`.
  func recover(_ db: Database) throws(ChunkStoreError) {
    var known: Set<String> = []
    for (id, committed) in try db.packCommits() {
      let path = packPath(id)
      known.insert((path as NSString).lastPathComponent)
      var st = stat()
      if stat(path, &st) == 0 && Int64(st.st_size) > committed {
        logger.info("reclaiming \(Int64(st.st_size) - committed) uncommitted bytes of \(path)")
        if truncate(path, off_t(committed)) != 0 { throw .io(path: path, operation: "truncate", errno: errno) }
      }
      if committed < Int64(configuration.packLimit) { bookkeeping.withLock { $0.idlePacks.append(id) } }
    }
    for name in (try? FileManager.default.contentsOfDirectory(atPath: packDirectory)) ?? [] where !known.contains(name) {
      logger.info("removing unknown pack file \(name)")
      unlink(packDirectory + "/" + name)
    }
    try sweepOrphanChunks(db)
  }

  /// Deletes chunk rows with no references (left when an ingest that borrowed them died) unless
  /// an ingest in flight borrows them. Caller holds the writer (or is `init`).
  func sweepOrphanChunks(_ db: Database) throws(ChunkStoreError) {
    var dead: [(Int64, Int64?, UInt64, UInt64)] = []
    let keep = bookkeeping.withLock { $0.borrowed }
    for c in try db.unreferencedChunks() {
      guard let d = c.digest, keep[d] == nil else { continue }
      dead.append((c.row, c.pack, c.offset, c.stored))
    }
    // Packed files of partial paths gone since, whose chunk never came.
    try db.deleteOrphanSlices()
    guard !dead.isEmpty else { return }
    do {
      try db.transaction {
        for d in dead { try db.deleteChunk(row: d.0) }
      }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "sweep", message: "\(error)") }
    adjustStored(removing: dead.reduce(0) { $0 + $1.3 })
    for case (_, let pack?, let off, let len) in dead { punchHole(try packFD(pack), offset: off, length: len) }
  }
}
