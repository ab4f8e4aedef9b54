import Foundation

/// One `chunks` row as fsck reads it: malformed values kept, for it to report.
struct ChunkRow {
  let row: Int64
  let digest: ChunkID?
  let size: Int64
  let stored: Int64
  let codec: Int64
  let pack: Int64?
  let offset: UInt64
  /// An inline chunk's bytes (read only when it has no pack).
  let inline: [UInt8]?
  let refs: Int64
}

// The index layer's full scans, for fsck: every row as it is. Tables that may be large are
// streamed to `body` rather than loaded.
extension Database {
  /// What SQLite's quick check finds wrong (nothing when the index file is sound).
  func integrityProblems() throws(ChunkStoreError) -> [String] {
    let integrity = try prepare("PRAGMA quick_check")
    var out: [String] = []
    while try integrity.step() {
      if let t = integrity.text(0), t != "ok" { out.append(t) }
    }
    return out
  }

  /// How many content lists name each chunk row.
  func chunkListReferences() throws(ChunkStoreError) -> [Int64: Int64] {
    var chunkRefs: [Int64: Int64] = [:]
    let cr = try prepare("SELECT chunk, COUNT(*) FROM content_chunks GROUP BY chunk")
    while try cr.step() { chunkRefs[cr.int(0)] = cr.int(1) }
    return chunkRefs
  }

  /// Packed small files (a slice of their one chunk), by the chunk row holding them.
  func packedFilesByChunk() throws(ChunkStoreError) -> [Int64: [(content: Int64, digest: ContentID?, skip: Int, size: Int)]] {
    var packedIn: [Int64: [(content: Int64, digest: ContentID?, skip: Int, size: Int)]] = [:]
    let pk = try prepare(
      """
      SELECT c.id, c.digest, c.skip, c.size, cc.chunk FROM contents c JOIN content_chunks cc ON cc.content = c.id
      JOIN chunks ch ON ch.id = cc.chunk WHERE c.skip > 0 OR c.size < ch.size
      """)
    while try pk.step() {
      packedIn[pk.int(4), default: []].append((pk.int(0), pk.contentID(1), Int(pk.int(2)), Int(pk.int(3))))
    }
    return packedIn
  }

  func forEachChunk(_ body: (ChunkRow) throws -> Void) throws {
    let c = try prepare("SELECT id, digest, size, stored, codec, pack, offset, data, refs FROM chunks")
    while try c.step() {
      let pack: Int64? = c.isNull(5) ? nil : c.int(5)
      try body(
        ChunkRow(
          row: c.int(0), digest: c.chunkID(1), size: c.int(2), stored: c.int(3), codec: c.int(4), pack: pack,
          offset: UInt64(c.int(6)), inline: pack == nil ? c.blob(7) : nil, refs: c.int(8)))
    }
  }

  /// Each complete or partial path's row, name and encoded tree.
  func forEachServablePath(_ body: (_ row: Int64, _ path: String?, _ tree: [UInt8]?) throws -> Void) throws {
    let t = try prepare("SELECT id, store_path, tree FROM paths WHERE state IN (1, 3)")
    while try t.step() { try body(t.int(0), t.text(1), t.blob(2)) }
  }

  /// Every content row: (row, digest, size, refs, skip).
  func contentRows() throws(ChunkStoreError) -> [(Int64, ContentID?, Int64, Int64, Int64)] {
    let ct = try prepare("SELECT id, digest, size, refs, skip FROM contents")
    var contentsList: [(Int64, ContentID?, Int64, Int64, Int64)] = []
    while try ct.step() { contentsList.append((ct.int(0), ct.contentID(1), ct.int(2), ct.int(3), ct.int(4))) }
    return contentsList
  }

  /// A content's chunk list as rows: (offset, chunk row), by offset.
  func chunkList(ofContent row: Int64) throws(ChunkStoreError) -> [(offset: Int64, chunk: Int64)] {
    let l = try prepare("SELECT offset, chunk FROM content_chunks WHERE content = ? ORDER BY offset").bind(row)
    var out: [(Int64, Int64)] = []
    while try l.step() { out.append((l.int(0), l.int(1))) }
    return out
  }
}
