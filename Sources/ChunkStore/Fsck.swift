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
    guard isWriter else { throw .index(path: indexPath, operation: "fsck", message: "store opened read-only") }
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
    for t in try db.integrityProblems() { problem("index: \(t)") }
    // Packs.
    var committed: [Int64: UInt64] = [:]
    for (id, length) in try db.packCommits() {
      committed[id] = UInt64(length)
      var st = stat()
      if stat(packPath(id), &st) != 0 {
        if length > 0 { problem("pack \(id): file \(packPath(id)) is missing") }
      } else if UInt64(st.st_size) < UInt64(length) {
        problem("pack \(id): file is \(st.st_size) bytes, index says \(length) are committed")
      }
    }
    // Chunk reference counts as the contents say.
    let chunkRefs = try db.chunkListReferences()
    // Packed small files, by the shared chunk holding them: their bytes are checked against their
    // digest with the chunk's (the chunk digest alone does not prove where each one starts).
    let packedIn = try db.packedFilesByChunk()
    // Every chunk: location, bytes, digest, refs.
    var chunkSize: [Int64: Int64] = [:]
    var chunkDigest: [Int64: ChunkID] = [:]
    try db.forEachChunk { c in
      scan.chunksChecked += 1
      let row = c.row
      chunkSize[row] = c.size
      guard let digest = c.digest else {
        problem("chunk row \(row): malformed digest")
        scan.badChunkRows.insert(row)
        return
      }
      chunkDigest[row] = digest
      let refs = c.refs
      if refs != (chunkRefs[row] ?? 0) {
        problem("chunk \(digest): reference count \(refs), but \(chunkRefs[row] ?? 0) content references")
      }
      if refs == 0 && chunkRefs[row] == nil && !isBorrowed(digest) { problem("chunk \(digest): orphan (no references)") }
      if c.codec == Codec.absent.rawValue {
        // A partial path's chunk not fetched yet: nothing to check but its references.
        scan.chunksAbsent += 1
        return
      }
      let stored: [UInt8]?
      let offset = c.offset
      let storedSize = Int(c.stored)
      if let pack = c.pack {
        if let limit = committed[pack], offset + UInt64(storedSize) <= limit {
          stored = preadFully(try packFD(pack), count: storedSize, offset: offset)
        } else {
          stored = nil
        }
      } else {
        stored = c.inline
      }
      let location = c.pack.map { "pack \($0) offset \(offset)" } ?? "inline"
      guard let stored, stored.count == storedSize else {
        problem("chunk \(digest) (\(location)): stored bytes missing or short")
        scan.badChunkRows.insert(row)
        return
      }
      let raw: [UInt8]? = c.codec == Codec.zstd.rawValue ? decompress(stored, rawSize: Int(c.size)) : stored
      guard let raw, raw.count == Int(c.size), ChunkID.of(raw) == digest else {
        problem("chunk \(digest) (\(location)): content does not match its digest")
        scan.badChunkRows.insert(row)
        return
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
    try db.forEachServablePath { pathRow, path, tree in
      scan.pathsChecked += 1
      guard let blob = tree, let nodes = Manifest.decodeTree(blob) else {
        problem("\(path ?? "?"): tree does not decode")
        scan.badPathRows.insert(pathRow)
        return
      }
      var mine: Set<ContentID> = []
      for n in nodes {
        if case .regular(let cid, _, _) = n.kind {
          contentRefs[cid, default: 0] += 1
          mine.insert(cid)
        }
      }
      pathContents[pathRow] = mine
    }
    // Every content: refs, and chunk list covering exactly its size with good chunks.
    var badContents: Set<ContentID> = []
    var seenContents: Set<ContentID> = []
    let listNamed = try Self.schemaFacts(db, indexPath).version >= Self.listNamedVersion
    for (row, digest, size, refs, skip) in try db.contentRows() {
      scan.contentsChecked += 1
      guard let digest else {
        problem("content row \(row): malformed digest")
        continue
      }
      seenContents.insert(digest)
      if refs != contentRefs[digest] ?? 0 {
        problem("content \(digest): reference count \(refs), but \(contentRefs[digest] ?? 0) files reference it")
      }
      var expect: Int64 = 0
      var count = 0
      var list: [ChunkRef] = []
      let reported = scan.badContentRows.contains(row)
      var bad = reported
      for (offset, chunk) in try db.chunkList(ofContent: row) {
        if offset != expect || chunkSize[chunk] == nil || scan.badChunkRows.contains(chunk) { bad = true }
        expect = offset + (chunkSize[chunk] ?? 0)
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
      for (pack, off, len) in freedRanges where !bookkeeping.withLock({ $0.leasedPacks.contains(pack) }) {
        punchHole(try packFD(pack), offset: off, length: len)
      }
    }
    dropLayouts()
    try retireEmptyPacks()
    forgetStoredTotal()
    return repaired
  }
}
