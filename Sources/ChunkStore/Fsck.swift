import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// What fsck found (and, with repair, did).
public struct FsckReport: Sendable, Hashable {
  public var problems: [String] = []
  public var repaired: [String] = []
  public var pathsChecked = 0
  public var contentsChecked = 0
  public var chunksChecked = 0
  public var isConsistent: Bool { problems.isEmpty }
}

extension ChunkStore {
  /// Checks the index against itself and every chunk against its digest. With `repair`, bad or
  /// missing chunks are removed, the paths that used them are marked incomplete (to be fetched
  /// again), reference counts are rebuilt and dead pack ranges punched; then it checks again.
  public func fsck(repair: Bool) throws(ChunkStoreError) -> FsckReport {
    guard writer != nil else { throw .index(path: indexPath, operation: "fsck", message: "store opened read-only") }
    var report = try check()
    guard repair, !report.isConsistent else { return report }
    let repaired = try repairStore()
    report = try check()
    report.repaired = repaired
    return report
  }

  struct Scan {
    var problems: [String] = []
    var badChunkRows: Set<Int64> = []
    var badContentRows: Set<Int64> = []
    var badPathRows: Set<Int64> = []
    var pathsChecked = 0
    var contentsChecked = 0
    var chunksChecked = 0
    var chunksAbsent = 0
  }

  func check() throws(ChunkStoreError) -> FsckReport {
    let scan = try scanStore()
    return FsckReport(
      problems: scan.problems, repaired: [], pathsChecked: scan.pathsChecked, contentsChecked: scan.contentsChecked,
      chunksChecked: scan.chunksChecked)
  }

  func scanStore() throws(ChunkStoreError) -> Scan {
    try gcLock.write { () throws(ChunkStoreError) -> Scan in
      try wrap("fsck") {
        try withWriter { db in try scan(db) }
      }
    }
  }

  private func scan(_ db: Database) throws -> Scan {
    var scan = Scan()
    func problem(_ s: String) {
      if scan.problems.count < 1000 { scan.problems.append(s) }
    }
    let integrity = try db.prepare("PRAGMA quick_check")
    while try integrity.step() {
      if let t = integrity.text(0), t != "ok" { problem("index: \(t)") }
    }
    // Packs.
    var committed: [Int64: UInt64] = [:]
    let p = try db.prepare("SELECT id, committed FROM packs")
    while try p.step() {
      let id = p.int(0)
      committed[id] = UInt64(p.int(1))
      var st = stat()
      if stat(packPath(id), &st) != 0 {
        if p.int(1) > 0 { problem("pack \(id): file \(packPath(id)) is missing") }
      } else if UInt64(st.st_size) < UInt64(p.int(1)) {
        problem("pack \(id): file is \(st.st_size) bytes, index says \(p.int(1)) are committed")
      }
    }
    // Chunk reference counts as the contents say.
    var chunkRefs: [Int64: Int64] = [:]
    let cr = try db.prepare("SELECT chunk, COUNT(*) FROM content_chunks GROUP BY chunk")
    while try cr.step() { chunkRefs[cr.int(0)] = cr.int(1) }
    // Packed small files, by the shared chunk holding them: their bytes are checked against their
    // digest with the chunk's (the chunk digest alone does not prove where each one starts).
    var packedIn: [Int64: [(content: Int64, digest: ContentID?, skip: Int, size: Int)]] = [:]
    let pk = try db.prepare(
      """
      SELECT c.id, c.digest, c.skip, c.size, cc.chunk FROM contents c JOIN content_chunks cc ON cc.content = c.id
      JOIN chunks ch ON ch.id = cc.chunk WHERE c.skip > 0 OR c.size < ch.size
      """)
    while try pk.step() {
      packedIn[pk.int(4), default: []].append((pk.int(0), pk.contentID(1), Int(pk.int(2)), Int(pk.int(3))))
    }
    // Every chunk: location, bytes, digest, refs.
    let c = try db.prepare("SELECT id, digest, size, stored, codec, pack, offset, data, refs FROM chunks")
    var chunkSize: [Int64: Int64] = [:]
    var chunkDigest: [Int64: ChunkID] = [:]
    while try c.step() {
      scan.chunksChecked += 1
      let row = c.int(0)
      chunkSize[row] = c.int(2)
      guard let digest = c.chunkID(1) else {
        problem("chunk row \(row): malformed digest")
        scan.badChunkRows.insert(row)
        continue
      }
      chunkDigest[row] = digest
      let refs = c.int(8)
      if refs != (chunkRefs[row] ?? 0) {
        problem("chunk \(digest): reference count \(refs), but \(chunkRefs[row] ?? 0) content references")
      }
      if refs == 0 && chunkRefs[row] == nil && !isBorrowed(digest) { problem("chunk \(digest): orphan (no references)") }
      if c.int(4) == Codec.absent.rawValue {
        // A partial path's chunk not fetched yet: nothing to check but its references.
        scan.chunksAbsent += 1
        continue
      }
      let stored: [UInt8]?
      let offset = UInt64(c.int(6))
      let storedSize = Int(c.int(3))
      if c.isNull(5) {
        stored = c.blob(7)
      } else {
        let pack = c.int(5)
        if let limit = committed[pack], offset + UInt64(storedSize) <= limit {
          stored = preadFully(try packFD(pack), count: storedSize, offset: offset)
        } else {
          stored = nil
        }
      }
      let location = c.isNull(5) ? "inline" : "pack \(c.int(5)) offset \(offset)"
      guard let stored, stored.count == storedSize else {
        problem("chunk \(digest) (\(location)): stored bytes missing or short")
        scan.badChunkRows.insert(row)
        continue
      }
      let raw: [UInt8]? = c.int(4) == Codec.zstd.rawValue ? decompress(stored, rawSize: Int(c.int(2))) : stored
      guard let raw, raw.count == Int(c.int(2)), ChunkID.of(raw) == digest else {
        problem("chunk \(digest) (\(location)): content does not match its digest")
        scan.badChunkRows.insert(row)
        continue
      }
      for f in packedIn[row] ?? [] {
        let fits = f.skip + f.size <= raw.count
        let got = fits ? raw.withUnsafeBytes { ContentID.of(UnsafeRawBufferPointer(rebasing: $0[f.skip..<f.skip + f.size])) } : nil
        if got == nil || got != f.digest {
          problem("content row \(f.content): its \(f.size) bytes at \(f.skip) of chunk \(digest) do not match its digest")
          scan.badContentRows.insert(f.content)
        }
      }
    }
    for (row, _) in chunkRefs where chunkSize[row] == nil {
      problem("content_chunks references missing chunk row \(row)")
    }
    // Content references as the trees say.
    var contentRefs: [ContentID: Int64] = [:]
    var pathContents: [Int64: Set<ContentID>] = [:]
    let t = try db.prepare("SELECT id, store_path, tree FROM paths WHERE state IN (1, 3)")
    while try t.step() {
      scan.pathsChecked += 1
      guard let blob = t.blob(2), let nodes = Manifest.decodeTree(blob) else {
        problem("\(t.text(1) ?? "?"): tree does not decode")
        scan.badPathRows.insert(t.int(0))
        continue
      }
      var mine: Set<ContentID> = []
      for n in nodes {
        if case .regular(let cid, _, _) = n.kind {
          contentRefs[cid, default: 0] += 1
          mine.insert(cid)
        }
      }
      pathContents[t.int(0)] = mine
    }
    // Every content: refs, and chunk list covering exactly its size with good chunks.
    var badContents: Set<ContentID> = []
    var seenContents: Set<ContentID> = []
    let listNamed = try Self.schemaFacts(db, indexPath).version >= Self.listNamedVersion
    let ct = try db.prepare("SELECT id, digest, size, refs, skip FROM contents")
    var contentsList: [(Int64, ContentID?, Int64, Int64, Int64)] = []
    while try ct.step() { contentsList.append((ct.int(0), ct.contentID(1), ct.int(2), ct.int(3), ct.int(4))) }
    for (row, digest, size, refs, skip) in contentsList {
      scan.contentsChecked += 1
      guard let digest else {
        problem("content row \(row): malformed digest")
        continue
      }
      seenContents.insert(digest)
      if refs != contentRefs[digest] ?? 0 {
        problem("content \(digest): reference count \(refs), but \(contentRefs[digest] ?? 0) files reference it")
      }
      let l = try db.prepare("SELECT offset, chunk FROM content_chunks WHERE content = ? ORDER BY offset").bind(row)
      var expect: Int64 = 0
      var count = 0
      var list: [ChunkRef] = []
      let reported = scan.badContentRows.contains(row)
      var bad = reported
      while try l.step() {
        let chunk = l.int(1)
        if l.int(0) != expect || chunkSize[chunk] == nil || scan.badChunkRows.contains(chunk) { bad = true }
        expect = l.int(0) + (chunkSize[chunk] ?? 0)
        count += 1
        if let d = chunkDigest[chunk], let n = chunkSize[chunk] { list.append(ChunkRef(id: d, size: UInt32(n))) }
      }
      // A content is named by its bytes (one chunk: that chunk's digest) or by its chunk list
      // (several): a row pointing at other chunks shows. Packed files are checked with their chunk.
      let misnamed =
        !bad
        && (count == 1 && skip == 0 && size == expect
          ? list.first.map { ContentID(chunk: $0.id) } != digest : listNamed && count > 1 && ContentID.ofChunkList(list) != digest)
      // The chunks hold exactly the content, or (a packed small file) one chunk holds it.
      if skip < 0 || (skip + size != expect && !(count == 1 && skip + size <= expect)) { bad = true }
      if misnamed {
        problem("content \(digest): \(count == 1 ? "its chunk's digest is not its name" : "its chunk list does not hash to its name")")
      } else if bad && !reported {
        problem("content \(digest): chunk list is broken or uses bad chunks")
      }
      if bad || misnamed {
        scan.badContentRows.insert(row)
        badContents.insert(digest)
      }
    }
    for (row, contents) in pathContents {
      let missing = contents.subtracting(seenContents)
      if !missing.isEmpty {
        problem("path row \(row): \(missing.count) file contents missing from the index")
      }
      if !missing.isEmpty || !contents.isDisjoint(with: badContents) { scan.badPathRows.insert(row) }
    }
    return scan
  }

  /// Marks damaged paths incomplete, drops bad chunks, rebuilds reference counts from the
  /// trees, frees what nothing references and punches dead pack ranges.
  func repairStore() throws(ChunkStoreError) -> [String] {
    let scan = try scanStore()
    var repaired: [String] = []
    var freedRanges: [(Int64, UInt64, UInt64)] = []
    try gcLock.write { () throws(ChunkStoreError) in
      try wrap("repair") {
        try withWriter { db in
          try db.transaction {
            for row in scan.badPathRows {
              if let p = try db.storePath(row: row) { repaired.append("marked \(p) incomplete: fetch it again") }
              try db.markIncomplete(row: row)
            }
            for row in scan.badChunkRows {
              try db.deleteChunk(row: row)
              repaired.append("removed bad chunk row \(row)")
            }
            // Rebuild content refs from the remaining trees.
            var contentRefs: [ContentID: Int64] = [:]
            for nodes in try db.servableTrees() {
              for n in nodes {
                if case .regular(let cid, _, _) = n.kind { contentRefs[cid, default: 0] += 1 }
              }
            }
            for (row, digest) in try db.contentDigests() {
              let refs = digest.flatMap { contentRefs[$0] } ?? 0
              if refs == 0 || scan.badContentRows.contains(row) {
                try db.deleteContent(row: row)
              } else {
                try db.setContentRefs(row: row, to: refs)
              }
            }
            try db.recountChunkRefs()
            var deadRows: [Int64] = []
            for c in try db.unreferencedChunks() {
              if let d = c.digest, isBorrowed(d) { continue }
              deadRows.append(c.row)
            }
            for row in deadRows { try db.deleteChunk(row: row) }
            if !deadRows.isEmpty { repaired.append("freed \(deadRows.count) unreferenced chunks") }
          }
          // Dead ranges: every gap between live chunks of a pack, and its tail.
          for (pack, committed) in try db.packCommits() {
            let limit = UInt64(committed)
            var cursor: UInt64 = 0
            for (off, stored) in try db.chunkExtents(pack: pack) {
              if off > cursor { freedRanges.append((pack, cursor, off - cursor)) }
              cursor = max(cursor, off + stored)
            }
            if limit > cursor { freedRanges.append((pack, cursor, limit - cursor)) }
          }
        }
      }
      for (pack, off, len) in freedRanges where !stateLock.locked({ leasedPacks.contains(pack) }) {
        punchHole(try packFD(pack), offset: off, length: len)
      }
    }
    dropLayouts()
    try retireEmptyPacks()
    forgetStoredTotal()
    return repaired
  }
}
