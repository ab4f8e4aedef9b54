import Foundation

// The index layer, `chunks` and `unverified_slices` tables. Statements run once per row of a
// commit are handed out prepared (the `…Statement` methods), for the caller to bind and run in
// its loop: looking the SQL text up again per row costs more than the row.
extension Database {
  /// Chunks no content references, as (row, digest, pack, offset, stored size).
  func unreferencedChunks() throws(ChunkStoreError) -> [(row: Int64, digest: ChunkID?, pack: Int64?, offset: UInt64, stored: UInt64)] {
    let s = try prepare("SELECT id, digest, pack, offset, stored FROM chunks WHERE refs = 0")
    var out: [(Int64, ChunkID?, Int64?, UInt64, UInt64)] = []
    while try s.step() { out.append((s.int(0), s.chunkID(1), s.isNull(2) ? nil : s.int(2), UInt64(s.int(3)), UInt64(s.int(4)))) }
    return out
  }

  func deleteChunk(row: Int64) throws(ChunkStoreError) {
    try prepare("DELETE FROM chunks WHERE id = ?").bind(row).run()
  }

  /// Whether the store holds this chunk's bytes (not only knows it, as a partial path's).
  func hasPresentChunk(_ id: ChunkID) throws(ChunkStoreError) -> Bool {
    try prepare("SELECT 1 FROM chunks WHERE digest = ? AND codec != 2").bind(id).step()
  }

  func hasAbsentChunks() throws(ChunkStoreError) -> Bool {
    try prepare("SELECT 1 FROM chunks WHERE codec = 2 LIMIT 1").step()
  }

  func isAbsentChunk(_ ref: ChunkRef) throws(ChunkStoreError) -> Bool {
    let s = try prepare("SELECT 1 FROM chunks WHERE digest = ? AND codec = 2 AND size = ?")
    s.set(1, ref.id)
    s.set(2, Int(ref.size))
    return try s.step()
  }

  func inlineChunkData(row: Int64) throws(ChunkStoreError) -> [UInt8]? {
    let s = try prepare("SELECT data FROM chunks WHERE id = ?").bind(row)
    return try s.step() ? s.blob(0) : nil
  }

  /// Where the chunk of `loc`'s row is now, if its bytes are here.
  func presentLocation(_ loc: ChunkStore.ChunkLocation) throws(ChunkStoreError) -> ChunkStore.ChunkLocation? {
    let s = try prepare("SELECT size, stored, codec, pack, offset FROM chunks WHERE id = ? AND codec != 2").bind(loc.rowID)
    guard try s.step() else { return nil }
    return ChunkStore.ChunkLocation(
      rowID: loc.rowID, id: loc.id, size: Int(s.int(0)), stored: Int(s.int(1)), codec: Codec(rawValue: s.int(2)) ?? .raw,
      pack: s.isNull(3) ? nil : s.int(3), offset: UInt64(s.int(4)))
  }

  /// A present chunk's stored form and place, by digest.
  func storedChunk(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocations.Location? {
    let s = try prepare("SELECT size, stored, codec, pack, offset, data FROM chunks WHERE digest = ? AND codec != 2").bind(id)
    guard try s.step() else { return nil }
    let chunk = StoredChunk(size: Int(s.int(0)), zstd: (Codec(rawValue: s.int(2)) ?? .raw) == .zstd, storedSize: Int(s.int(1)))
    let pack: Int64? = s.isNull(3) ? nil : s.int(3)
    let inline = pack == nil ? s.blob(5) : nil
    guard pack != nil || inline?.count == chunk.storedSize else {
      throw ChunkStoreError.chunkCorrupt(chunk: id, pack: 0, offset: 0, reason: "inline data missing")
    }
    return ChunkLocations.Location(chunk: chunk, pack: pack, offset: UInt64(s.int(4)), inline: inline)
  }

  /// Drops one reference of a chunk row; returns the row's refs, digest, pack, offset and stored
  /// size after that (nil when the row is gone).
  func releaseChunk(row: Int64) throws(ChunkStoreError) -> (refs: Int64, digest: ChunkID?, pack: Int64?, offset: UInt64, stored: UInt64)? {
    try prepare("UPDATE chunks SET refs = refs - 1 WHERE id = ?").bind(row).run()
    let q = try prepare("SELECT refs, digest, pack, offset, stored FROM chunks WHERE id = ?").bind(row)
    guard try q.step() else { return nil }
    return (q.int(0), q.chunkID(1), q.isNull(2) ? nil : q.int(2), UInt64(q.int(3)), UInt64(q.int(4)))
  }

  /// Binds stored, codec, pack, offset, data, digest: gives an absent chunk its bytes.
  func fillAbsentChunkStatement() throws(ChunkStoreError) -> Statement {
    try prepare("UPDATE chunks SET stored = ?, codec = ?, pack = ?, offset = ?, data = ? WHERE digest = ? AND codec = 2")
  }

  /// Binds digest, size, stored, codec, pack, offset, data, refs.
  func insertChunkStatement() throws(ChunkStoreError) -> Statement {
    try prepare(
      """
      INSERT OR IGNORE INTO chunks(digest, size, stored, codec, pack, offset, data, refs)
      VALUES(?, ?, ?, ?, ?, ?, ?, ?)
      """
    )
  }

  /// Binds digest, size: a chunk known but not here (a partial path's), with no references yet.
  func insertAbsentChunkStatement() throws(ChunkStoreError) -> Statement {
    try prepare(
      "INSERT OR IGNORE INTO chunks(digest, size, stored, codec, pack, offset, data, refs) VALUES(?, ?, 0, 2, NULL, 0, NULL, 0)"
    )
  }

  /// Binds refs, digest; a row back with the chunk's row id.
  func addChunkRefsStatement() throws(ChunkStoreError) -> Statement {
    try prepare("UPDATE chunks SET refs = refs + ? WHERE digest = ? RETURNING id")
  }

  /// Binds refs, digest; a row back with the chunk's row id and size.
  func addChunkRefsCheckingSizeStatement() throws(ChunkStoreError) -> Statement {
    try prepare("UPDATE chunks SET refs = refs + ? WHERE digest = ? RETURNING id, size")
  }

  // Slices: packed small files of partial paths, to check against their names when their chunk comes.

  /// Binds chunk, content, skip, size.
  func insertSliceStatement() throws(ChunkStoreError) -> Statement {
    try prepare("INSERT OR IGNORE INTO unverified_slices(chunk, content, skip, size) VALUES(?, ?, ?, ?)")
  }

  /// Binds chunk, content.
  func deleteSliceStatement() throws(ChunkStoreError) -> Statement {
    try prepare("DELETE FROM unverified_slices WHERE chunk = ? AND content = ?")
  }

  /// Binds chunk.
  func deleteSlicesOfChunkStatement() throws(ChunkStoreError) -> Statement {
    try prepare("DELETE FROM unverified_slices WHERE chunk = ?")
  }

  func slices(in id: ChunkID) throws(ChunkStoreError) -> [(content: ContentID, skip: Int, size: Int)] {
    let s = try prepare("SELECT content, skip, size FROM unverified_slices WHERE chunk = ?").bind(id)
    var out: [(ContentID, Int, Int)] = []
    while try s.step() { if let d = s.contentID(0) { out.append((d, Int(s.int(1)), Int(s.int(2)))) } }
    return out
  }

  /// Unverified slices whose chunk is here: (chunk, content, skip, size).
  func heldSlices() throws(ChunkStoreError) -> [(ChunkStore.ChunkLocation, ContentID, Int, Int)] {
    let s = try prepare(
      "SELECT s.content, s.skip, s.size, ch.id, ch.digest, ch.size, ch.stored, ch.codec, ch.pack, ch.offset "
        + "FROM unverified_slices s JOIN chunks ch ON ch.digest = s.chunk WHERE ch.codec != 2")
    var out: [(ChunkStore.ChunkLocation, ContentID, Int, Int)] = []
    while try s.step() {
      guard let content = s.contentID(0), let id = s.chunkID(4) else { continue }
      let loc = ChunkStore.ChunkLocation(
        rowID: s.int(3), id: id, size: Int(s.int(5)), stored: Int(s.int(6)), codec: Codec(rawValue: s.int(7)) ?? .raw,
        pack: s.isNull(8) ? nil : s.int(8), offset: UInt64(s.int(9)))
      out.append((loc, content, Int(s.int(1)), Int(s.int(2))))
    }
    return out
  }

  /// Slices of packed files whose chunk row is gone (their path went before the chunk came).
  func deleteOrphanSlices() throws(ChunkStoreError) {
    try exec("DELETE FROM unverified_slices WHERE chunk NOT IN (SELECT digest FROM chunks)")
  }
}

// Repair: recounting and the live ranges of packs.
extension Database {
  /// Sets every chunk's reference count to the content lists that name it.
  func recountChunkRefs() throws(ChunkStoreError) {
    try exec(
      "UPDATE chunks SET refs = (SELECT COUNT(*) FROM content_chunks cc WHERE cc.chunk = chunks.id)")
  }

  /// (offset, stored size) of each chunk in a pack, by offset.
  func chunkExtents(pack: Int64) throws(ChunkStoreError) -> [(offset: UInt64, stored: UInt64)] {
    let s = try prepare("SELECT offset, stored FROM chunks WHERE pack = ? ORDER BY offset").bind(pack)
    var out: [(UInt64, UInt64)] = []
    while try s.step() { out.append((UInt64(s.int(0)), UInt64(s.int(1)))) }
    return out
  }
}
