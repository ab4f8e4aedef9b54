import Foundation

#if canImport(Glibc)
  import Glibc
#endif

extension ChunkStore {
  /// Undo a crashed writer: cut packs back to their committed length, delete pack files the
  /// index does not know, and drop chunks no content references.
  func recover() throws(ChunkStoreError) {
    guard let db = writer else { return }
    var known: Set<String> = []
    let s = try db.prepare("SELECT id, committed FROM packs")
    var packs: [(Int64, Int64)] = []
    while try s.step() { packs.append((s.int(0), s.int(1))) }
    for (id, committed) in packs {
      let path = packPath(id)
      known.insert((path as NSString).lastPathComponent)
      var st = stat()
      if stat(path, &st) == 0 && Int64(st.st_size) > committed {
        logger.info("reclaiming \(Int64(st.st_size) - committed) uncommitted bytes of \(path)")
        if truncate(path, off_t(committed)) != 0 { throw .io(path: path, operation: "truncate", errno: errno) }
      }
      if committed < Int64(configuration.packLimit) { idlePacks.append(id) }
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
    let s = try db.prepare("SELECT id, digest, pack, offset, stored FROM chunks WHERE refs = 0")
    var dead: [(Int64, Int64?, UInt64, UInt64)] = []
    let keep = stateLock.locked { borrowed }
    while try s.step() {
      guard let d = s.digest(1), keep[d] == nil else { continue }
      dead.append((s.int(0), s.isNull(2) ? nil : s.int(2), UInt64(s.int(3)), UInt64(s.int(4))))
    }
    // Packed files of partial paths gone since, whose chunk never came.
    try db.exec("DELETE FROM unverified_slices WHERE chunk NOT IN (SELECT digest FROM chunks)")
    guard !dead.isEmpty else { return }
    let del = "DELETE FROM chunks WHERE id = ?"
    do {
      try db.transaction {
        for d in dead { try db.prepare(del).bind(d.0).run() }
      }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "sweep", message: "\(error)") }
    adjustStored(removing: dead.reduce(0) { $0 + $1.3 })
    for case (_, let pack?, let off, let len) in dead { punchHole(try packFD(pack), offset: off, length: len) }
  }
}
