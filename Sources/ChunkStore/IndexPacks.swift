import Foundation

// The index layer, `packs` table: each pack file and how many of its bytes are committed.
extension Database {
  func packCommits() throws(ChunkStoreError) -> [(id: Int64, committed: Int64)] {
    let s = try prepare("SELECT id, committed FROM packs")
    var out: [(Int64, Int64)] = []
    while try s.step() { out.append((s.int(0), s.int(1))) }
    return out
  }

  /// A new, empty pack's id.
  func insertPack() throws(ChunkStoreError) -> Int64 {
    try prepare("INSERT INTO packs(committed) VALUES(0)").run()
    return lastInsertRowID
  }

  /// Packs that had bytes committed but hold no chunk any more.
  func emptyPacks() throws(ChunkStoreError) -> [Int64] {
    let s = try prepare(
      "SELECT id FROM packs p WHERE committed > 0 AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = p.id)")
    var out: [Int64] = []
    while try s.step() { out.append(s.int(0)) }
    return out
  }

  func deletePack(_ id: Int64) throws(ChunkStoreError) {
    try prepare("DELETE FROM packs WHERE id = ?").bind(id).run()
  }

  /// Records that the pack's bytes up to `end` are durable (never moves the mark back).
  func commitPack(_ id: Int64, upTo end: UInt64) throws(ChunkStoreError) {
    try prepare("UPDATE packs SET committed = max(committed, ?) WHERE id = ?").bind(end, id).run()
  }
}
