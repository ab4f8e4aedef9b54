import Foundation

// The index layer, `contents` and `content_chunks` tables: file contents, their reference counts
// and chunk lists.
extension Database {
  /// Where a content's bytes are: its size, skip and chunk locations in order. `hasSkip` is false
  /// for an index no writer of this version has migrated yet (no `skip` column).
  func contentLayout(_ content: ContentID, hasSkip: Bool) throws(ChunkStoreError) -> ChunkStore.ContentLayout {
    let c = try prepare(
      hasSkip
        ? "SELECT id, size, skip FROM contents WHERE digest = ?" : "SELECT id, size, 0 FROM contents WHERE digest = ?"
    ).bind(content)
    guard try c.step() else { throw ChunkStoreError.contentNotFound(content) }
    let contentRow = c.int(0)
    let size = UInt64(c.int(1))
    let skip = UInt64(c.int(2))
    let s = try prepare(
      """
      SELECT cc.offset, ch.id, ch.digest, ch.size, ch.stored, ch.codec, ch.pack, ch.offset
      FROM content_chunks cc LEFT JOIN chunks ch ON ch.id = cc.chunk WHERE cc.content = ? ORDER BY cc.offset
      """
    ).bind(contentRow)
    var starts: [UInt64] = []
    var chunks: [ChunkStore.ChunkLocation] = []
    while try s.step() {
      guard let d = s.chunkID(2) else { throw ChunkStoreError.chunkMissing(chunk: nil, content: content) }
      starts.append(UInt64(s.int(0)))
      chunks.append(
        ChunkStore.ChunkLocation(
          rowID: s.int(1), id: d, size: Int(s.int(3)), stored: Int(s.int(4)), codec: Codec(rawValue: s.int(5)) ?? .raw,
          pack: s.isNull(6) ? nil : s.int(6), offset: UInt64(s.int(7))))
    }
    return ChunkStore.ContentLayout(size: size, skip: skip, starts: starts, chunks: chunks)
  }

  /// A content's row and reference count.
  func contentRefs(_ content: ContentID) throws(ChunkStoreError) -> (row: Int64, refs: Int64)? {
    let c = try prepare("SELECT id, refs FROM contents WHERE digest = ?").bind(content)
    return try c.step() ? (c.int(0), c.int(1)) : nil
  }

  func dropContentRefs(row: Int64, by count: Int) throws(ChunkStoreError) {
    try prepare("UPDATE contents SET refs = refs - ? WHERE id = ?").bind(count, row).run()
  }

  func setContentRefs(row: Int64, to refs: Int64) throws(ChunkStoreError) {
    try prepare("UPDATE contents SET refs = ? WHERE id = ?").bind(refs, row).run()
  }

  /// The chunk rows of a content's list (in no particular order).
  func chunkRows(ofContent row: Int64) throws(ChunkStoreError) -> [Int64] {
    let cc = try prepare("SELECT chunk FROM content_chunks WHERE content = ?").bind(row)
    var out: [Int64] = []
    while try cc.step() { out.append(cc.int(0)) }
    return out
  }

  /// Deletes a content row and its chunk list (not the chunks).
  func deleteContent(row: Int64) throws(ChunkStoreError) {
    try prepare("DELETE FROM content_chunks WHERE content = ?").bind(row).run()
    try prepare("DELETE FROM contents WHERE id = ?").bind(row).run()
  }

  /// Every content's row and digest.
  func contentDigests() throws(ChunkStoreError) -> [(row: Int64, digest: ContentID?)] {
    let ct = try prepare("SELECT id, digest FROM contents")
    var rows: [(Int64, ContentID?)] = []
    while try ct.step() { rows.append((ct.int(0), ct.contentID(1))) }
    return rows
  }

  /// Inserts the row of `content` (its size, `count` references, where its packed file starts)
  /// with `insert` (`insertContentStatement`): the new row's id, or nil when the index already
  /// has the content (the caller then adds references). Ingest and partial registration alike.
  func insertContent(_ insert: Statement, _ content: ContentID, size: UInt64, count: Int, skip: Int) throws(ChunkStoreError)
    -> Int64?
  {
    insert.again()
    insert.set(1, content)
    insert.set(2, size)
    insert.set(3, count)
    insert.set(4, skip)
    try insert.run()
    return changes == 1 ? lastInsertRowID : nil
  }

  /// Binds digest, size, refs, skip.
  func insertContentStatement() throws(ChunkStoreError) -> Statement {
    try prepare("INSERT OR IGNORE INTO contents(digest, size, refs, skip) VALUES(?, ?, ?, ?)")
  }

  /// Binds refs, digest.
  func addContentRefsStatement() throws(ChunkStoreError) -> Statement {
    try prepare("UPDATE contents SET refs = refs + ? WHERE digest = ?")
  }

  /// Binds refs, digest; a row back with the content's size.
  func addContentRefsReturningSizeStatement() throws(ChunkStoreError) -> Statement {
    try prepare("UPDATE contents SET refs = refs + ? WHERE digest = ? RETURNING size")
  }

  /// The chunk lists of contents new to the index (ingest and partial registration alike).
  func insertChunkLists(_ contents: [(ContentID, Int64)], of manifest: Manifest, rows: [ChunkID: Int64]) throws(ChunkStoreError) {
    let insertList = try prepare("INSERT INTO content_chunks(content, offset, chunk) VALUES(?, ?, ?)")
    for (content, contentRow) in contents {
      var offset: UInt64 = 0
      for ref in manifest.chunks[content] ?? [] {
        insertList.again()
        insertList.set(1, contentRow)
        insertList.set(2, offset)
        insertList.set(3, rows[ref.id]!)
        try insertList.run()
        offset += UInt64(ref.size)
      }
    }
  }
}
