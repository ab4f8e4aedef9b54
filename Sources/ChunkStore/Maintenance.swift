import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// What a GC run did.
public struct GCReport: Sendable, Hashable {
  public var evicted: [String] = []
  public var freedBytes: UInt64 = 0
  public var storedBytesBefore: UInt64 = 0
  public var storedBytesAfter: UInt64 = 0
}

/// What fsck found (and, with repair, did).
public struct FsckReport: Sendable, Hashable {
  public var problems: [String] = []
  public var repaired: [String] = []
  public var pathsChecked = 0
  public var contentsChecked = 0
  public var chunksChecked = 0
  public var isConsistent: Bool { problems.isEmpty }
}

public struct StoreStats: Sendable, Hashable, Codable {
  public init() {}
  public var paths = 0
  public var incompletePaths = 0
  /// Paths materialised from a chunk index, with chunks still to fetch.
  public var partialPaths = 0
  /// Chunks those paths know but do not hold yet, and their uncompressed bytes.
  public var absentChunks = 0
  public var absentBytes: UInt64 = 0
  public var files = 0
  public var contents = 0
  public var chunks = 0
  public var inlineChunks = 0
  public var packs = 0
  /// Sum of the NarSizes of complete paths.
  public var narBytes: UInt64 = 0
  /// Sum of regular file sizes over all complete paths (what a reader sees).
  public var logicalBytes: UInt64 = 0
  /// Sum of distinct file contents' sizes.
  public var uniqueContentBytes: UInt64 = 0
  /// Sum of distinct chunks' uncompressed sizes.
  public var chunkBytes: UInt64 = 0
  /// Sum of distinct chunks' stored (compressed) sizes.
  public var storedBytes: UInt64 = 0
  /// Blocks allocated to pack files, plus the index files.
  public var diskBytes: UInt64 = 0

  /// logical / unique chunk bytes.
  public var dedupRatio: Double { chunkBytes == 0 ? 1 : Double(logicalBytes) / Double(chunkBytes) }
  /// unique chunk bytes / stored bytes.
  public var compressionRatio: Double { storedBytes == 0 ? 1 : Double(chunkBytes) / Double(storedBytes) }
  /// NAR bytes / stored bytes.
  public var overallRatio: Double { storedBytes == 0 ? 1 : Double(narBytes) / Double(storedBytes) }
}

extension ChunkStore {
  func wrap<T>(_ operation: String, _ body: () throws -> T) throws(ChunkStoreError) -> T {
    do { return try body() } catch let e as ChunkStoreError { throw e } catch {
      throw .index(path: indexPath, operation: operation, message: "\(error)")
    }
  }

  /// Stored bytes of all chunks. The writer keeps a running total (it is the only process that
  /// changes it), so the online budget check after each commit is not a scan of the chunks.
  public func storedBytes() throws(ChunkStoreError) -> UInt64 {
    if writer != nil, let total = stateLock.locked({ storedTotal }) { return total }
    let total: UInt64 = try wrap("stored bytes") {
      try withReader { db in
        let s = try db.prepare("SELECT COALESCE(SUM(stored), 0) FROM chunks")
        _ = try s.step()
        return UInt64(s.int(0))
      }
    }
    if writer != nil { stateLock.locked { storedTotal = total } }
    return total
  }

  /// Adjusts the running total after a committed change (nil total: recomputed when next asked).
  func adjustStored(adding: UInt64 = 0, removing: UInt64 = 0) {
    stateLock.locked {
      guard let t = storedTotal else { return }
      storedTotal = t + adding - min(t + adding, removing)
    }
  }

  func forgetStoredTotal() { stateLock.locked { storedTotal = nil } }

  // MARK: GC

  /// Evicts whole complete paths, least recently used first, until the chunks' stored bytes are
  /// at most `maxStoredBytes`. Pinned paths (durable pins, in-process pins, ingests) are skipped.
  /// Each eviction is its own transaction taken with reads excluded, so a reader sees a path
  /// either whole or gone.
  @discardableResult
  public func collectGarbage(maxStoredBytes: UInt64) throws(ChunkStoreError) -> GCReport {
    flushTouches()
    var report = GCReport()
    let before = try storedBytes()
    report.storedBytesBefore = before
    report.storedBytesAfter = before
    guard before > maxStoredBytes else { return report }
    let candidates: [(Int64, String)] = try wrap("gc candidates") {
      try withWriter { db in
        let pinned = try pinnedPaths(db)
        let s = try db.prepare("SELECT id, store_path FROM paths WHERE state IN (1, 3) ORDER BY last_access, id")
        var out: [(Int64, String)] = []
        while try s.step() { if let p = s.text(1), !pinned.contains(p) { out.append((s.int(0), p)) } }
        return out
      }
    }
    var stored = before
    for (row, path) in candidates where stored > maxStoredBytes {
      let freed = try evict(row: row, path: path, keepAsIncomplete: false)
      guard let freed else { continue }
      stored -= min(stored, freed)
      report.evicted.append(path)
      report.freedBytes += freed
    }
    // Chunks an aborted ingest borrowed and GC had to keep: free them now if nobody needs them.
    try gcLock.write { () throws(ChunkStoreError) in
      try wrap("sweep") { try withWriter { db in try sweepOrphanChunks(db) } }
    }
    try retireEmptyPacks()
    report.storedBytesAfter = try storedBytes()
    if !report.evicted.isEmpty {
      logger.info("gc evicted \(report.evicted.count) paths, freed \(report.freedBytes) bytes")
    }
    return report
  }

  /// Removes one complete path now (unless pinned).
  public func remove(_ path: StorePath) throws(ChunkStoreError) {
    let row: Int64? = try wrap("remove") {
      try withWriter { db in
        if try pinnedPaths(db).contains(path.path) { throw ChunkStoreError.pinned(storePath: path.path) }
        let s = try db.prepare("SELECT id FROM paths WHERE store_path = ? AND state IN (1, 3)").bind(path.path)
        return try s.step() ? s.int(0) : nil
      }
    }
    guard let row else { throw .notComplete(storePath: path.path) }
    _ = try evict(row: row, path: path.path, keepAsIncomplete: false)
    try retireEmptyPacks()
  }

  /// Drops one path's references in one transaction; frees chunks nobody references any more.
  /// Returns the stored bytes freed, or nil when the path was pinned or gone in the meantime.
  func evict(row: Int64, path: String, keepAsIncomplete: Bool) throws(ChunkStoreError) -> UInt64? {
    try gcLock.write { () throws(ChunkStoreError) -> UInt64? in
      var freedRanges: [(Int64, UInt64, UInt64)] = []
      var deadContents: [ContentID] = []
      var freed: UInt64 = 0
      let done: Bool = try wrap("evict \(path)") {
        try withWriter { db in
          try db.transaction {
            // Re-check under the writer: a pin or touch may have come since the candidate list.
            if !keepAsIncomplete, try pinnedPaths(db).contains(path) { return false }
            let s = try db.prepare("SELECT tree FROM paths WHERE id = ? AND state IN (1, 3)").bind(row)
            guard try s.step() else { return false }
            let nodes = s.blob(0).flatMap(Manifest.decodeTree) ?? []
            var multiplicity: [ContentID: Int] = [:]
            for n in nodes { if case .regular(let c, _, _) = n.kind { multiplicity[c, default: 0] += 1 } }
            for (content, m) in multiplicity {
              let c = try db.prepare("SELECT id, refs FROM contents WHERE digest = ?").bind(content)
              guard try c.step() else { continue }
              let contentRow = c.int(0)
              if c.int(1) > Int64(m) {
                try db.prepare("UPDATE contents SET refs = refs - ? WHERE id = ?").bind(m, contentRow).run()
                continue
              }
              deadContents.append(content)
              let cc = try db.prepare("SELECT chunk FROM content_chunks WHERE content = ?").bind(contentRow)
              var chunkRows: [Int64] = []
              while try cc.step() { chunkRows.append(cc.int(0)) }
              try db.prepare("DELETE FROM content_chunks WHERE content = ?").bind(contentRow).run()
              try db.prepare("DELETE FROM contents WHERE id = ?").bind(contentRow).run()
              for chunkRow in chunkRows {
                try db.prepare("UPDATE chunks SET refs = refs - 1 WHERE id = ?").bind(chunkRow).run()
                let q = try db.prepare("SELECT refs, digest, pack, offset, stored FROM chunks WHERE id = ?").bind(chunkRow)
                guard try q.step(), q.int(0) <= 0, let d = q.digest(1), !isBorrowed(d) else { continue }
                if !q.isNull(2) { freedRanges.append((q.int(2), UInt64(q.int(3)), UInt64(q.int(4)))) }
                freed += UInt64(q.int(4))
                try db.prepare("DELETE FROM chunks WHERE id = ?").bind(chunkRow).run()
              }
            }
            if keepAsIncomplete {
              try db.prepare("UPDATE paths SET state = 2, tree = NULL, files = 0, file_bytes = 0 WHERE id = ?").bind(row).run()
            } else {
              try db.prepare("DELETE FROM paths WHERE id = ?").bind(row).run()
            }
            return true
          }
        }
      }
      guard done else { return nil }
      evictionCount.add(1, ordering: .releasing)
      adjustStored(removing: freed)
      invalidate(contents: deadContents)
      for (pack, offset, len) in freedRanges { punchHole(try packFD(pack), offset: offset, length: len) }
      return freed
    }
  }

  /// Deletes packs that hold no live chunk and that no ingest is appending to.
  func retireEmptyPacks() throws(ChunkStoreError) {
    let empty: [Int64] = try wrap("empty packs") {
      try withWriter { db in
        let s = try db.prepare(
          "SELECT id FROM packs p WHERE committed > 0 AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = p.id)")
        var out: [Int64] = []
        while try s.step() { out.append(s.int(0)) }
        return out
      }
    }
    for id in empty where retirePack(id) {
      try wrap("retire pack") { try withWriter { db in try db.prepare("DELETE FROM packs WHERE id = ?").bind(id).run() } }
      unlink(packPath(id))
    }
  }

  // MARK: fsck

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
    var packedIn: [Int64: [(content: Int64, digest: SHA256Digest?, skip: Int, size: Int)]] = [:]
    let pk = try db.prepare(
      """
      SELECT c.id, c.digest, c.skip, c.size, cc.chunk FROM contents c JOIN content_chunks cc ON cc.content = c.id
      JOIN chunks ch ON ch.id = cc.chunk WHERE c.skip > 0 OR c.size < ch.size
      """)
    while try pk.step() {
      packedIn[pk.int(4), default: []].append((pk.int(0), pk.digest(1), Int(pk.int(2)), Int(pk.int(3))))
    }
    // Every chunk: location, bytes, digest, refs.
    let c = try db.prepare("SELECT id, digest, size, stored, codec, pack, offset, data, refs FROM chunks")
    var chunkSize: [Int64: Int64] = [:]
    var chunkDigest: [Int64: ChunkID] = [:]
    while try c.step() {
      scan.chunksChecked += 1
      let row = c.int(0)
      chunkSize[row] = c.int(2)
      guard let digest = c.digest(1) else {
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
      guard let raw, raw.count == Int(c.int(2)), SHA256Digest.of(raw) == digest else {
        problem("chunk \(digest) (\(location)): content does not match its digest")
        scan.badChunkRows.insert(row)
        continue
      }
      for f in packedIn[row] ?? [] {
        let fits = f.skip + f.size <= raw.count
        let got = fits ? raw.withUnsafeBytes { SHA256Digest.of(UnsafeRawBufferPointer(rebasing: $0[f.skip..<f.skip + f.size])) } : nil
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
    var contentRefs: [SHA256Digest: Int64] = [:]
    var pathContents: [Int64: Set<SHA256Digest>] = [:]
    let t = try db.prepare("SELECT id, store_path, tree FROM paths WHERE state IN (1, 3)")
    while try t.step() {
      scan.pathsChecked += 1
      guard let blob = t.blob(2), let nodes = Manifest.decodeTree(blob) else {
        problem("\(t.text(1) ?? "?"): tree does not decode")
        scan.badPathRows.insert(t.int(0))
        continue
      }
      var mine: Set<SHA256Digest> = []
      for n in nodes {
        if case .regular(let cid, _, _) = n.kind {
          contentRefs[cid, default: 0] += 1
          mine.insert(cid)
        }
      }
      pathContents[t.int(0)] = mine
    }
    // Every content: refs, and chunk list covering exactly its size with good chunks.
    var badContents: Set<SHA256Digest> = []
    var seenContents: Set<SHA256Digest> = []
    let listNamed = try Self.schemaFacts(db, indexPath).version >= Self.listNamedVersion
    let ct = try db.prepare("SELECT id, digest, size, refs, skip FROM contents")
    var contentsList: [(Int64, SHA256Digest?, Int64, Int64, Int64)] = []
    while try ct.step() { contentsList.append((ct.int(0), ct.digest(1), ct.int(2), ct.int(3), ct.int(4))) }
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
          ? list.first?.id != digest : listNamed && count > 1 && ContentID.ofChunkList(list) != digest)
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
              let s = try db.prepare("SELECT store_path FROM paths WHERE id = ?").bind(row)
              if try s.step(), let p = s.text(0) { repaired.append("marked \(p) incomplete: fetch it again") }
              try db.prepare("UPDATE paths SET state = 2, tree = NULL, files = 0, file_bytes = 0 WHERE id = ?").bind(row).run()
            }
            for row in scan.badChunkRows {
              try db.prepare("DELETE FROM chunks WHERE id = ?").bind(row).run()
              repaired.append("removed bad chunk row \(row)")
            }
            // Rebuild content refs from the remaining trees.
            var contentRefs: [SHA256Digest: Int64] = [:]
            let t = try db.prepare("SELECT tree FROM paths WHERE state IN (1, 3)")
            while try t.step() {
              for n in t.blob(0).flatMap(Manifest.decodeTree) ?? [] {
                if case .regular(let cid, _, _) = n.kind { contentRefs[cid, default: 0] += 1 }
              }
            }
            let ct = try db.prepare("SELECT id, digest FROM contents")
            var rows: [(Int64, SHA256Digest?)] = []
            while try ct.step() { rows.append((ct.int(0), ct.digest(1))) }
            for (row, digest) in rows {
              let refs = digest.flatMap { contentRefs[$0] } ?? 0
              if refs == 0 || scan.badContentRows.contains(row) {
                try db.prepare("DELETE FROM content_chunks WHERE content = ?").bind(row).run()
                try db.prepare("DELETE FROM contents WHERE id = ?").bind(row).run()
              } else {
                try db.prepare("UPDATE contents SET refs = ? WHERE id = ?").bind(refs, row).run()
              }
            }
            try db.exec(
              "UPDATE chunks SET refs = (SELECT COUNT(*) FROM content_chunks cc WHERE cc.chunk = chunks.id)")
            let dead = try db.prepare("SELECT id, digest, pack, offset, stored FROM chunks WHERE refs = 0")
            var deadRows: [Int64] = []
            while try dead.step() {
              if let d = dead.digest(1), isBorrowed(d) { continue }
              deadRows.append(dead.int(0))
            }
            for row in deadRows { try db.prepare("DELETE FROM chunks WHERE id = ?").bind(row).run() }
            if !deadRows.isEmpty { repaired.append("freed \(deadRows.count) unreferenced chunks") }
          }
          // Dead ranges: every gap between live chunks of a pack, and its tail.
          let packs = try db.prepare("SELECT id, committed FROM packs")
          var committed: [(Int64, UInt64)] = []
          while try packs.step() { committed.append((packs.int(0), UInt64(packs.int(1)))) }
          for (pack, limit) in committed {
            var cursor: UInt64 = 0
            let s = try db.prepare("SELECT offset, stored FROM chunks WHERE pack = ? ORDER BY offset").bind(pack)
            while try s.step() {
              let off = UInt64(s.int(0))
              if off > cursor { freedRanges.append((pack, cursor, off - cursor)) }
              cursor = max(cursor, off + UInt64(s.int(1)))
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

  // MARK: Stats

  public func stats() throws(ChunkStoreError) -> StoreStats {
    try wrap("stats") {
      try withReader { db in
        var st = StoreStats()
        let p = try db.prepare(
          "SELECT COUNT(*), COALESCE(SUM(files), 0), COALESCE(SUM(nar_size), 0), COALESCE(SUM(file_bytes), 0) FROM paths WHERE state = 1")
        _ = try p.step()
        (st.paths, st.files, st.narBytes, st.logicalBytes) = (Int(p.int(0)), Int(p.int(1)), UInt64(p.int(2)), UInt64(p.int(3)))
        let i = try db.prepare("SELECT COUNT(*) FROM paths WHERE state = 2")
        _ = try i.step()
        st.incompletePaths = Int(i.int(0))
        let pp = try db.prepare("SELECT COUNT(*) FROM paths WHERE state = 3")
        _ = try pp.step()
        st.partialPaths = Int(pp.int(0))
        let ab = try db.prepare("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks WHERE codec = 2")
        _ = try ab.step()
        (st.absentChunks, st.absentBytes) = (Int(ab.int(0)), UInt64(ab.int(1)))
        let c = try db.prepare("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM contents")
        _ = try c.step()
        (st.contents, st.uniqueContentBytes) = (Int(c.int(0)), UInt64(c.int(1)))
        let k = try db.prepare(
          "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(stored), 0), COALESCE(SUM(pack IS NULL), 0) FROM chunks WHERE codec != 2")
        _ = try k.step()
        (st.chunks, st.chunkBytes, st.storedBytes, st.inlineChunks) = (Int(k.int(0)), UInt64(k.int(1)), UInt64(k.int(2)), Int(k.int(3)))
        let n = try db.prepare("SELECT COUNT(*) FROM packs")
        _ = try n.step()
        st.packs = Int(n.int(0))
        var disk: UInt64 = 0
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: packDirectory)) ?? []).map { packDirectory + "/" + $0 }
          + [indexPath, indexPath + "-wal"]
        for f in files {
          var s = stat()
          if stat(f, &s) == 0 { disk += UInt64(s.st_blocks) * 512 }
        }
        st.diskBytes = disk
        return st
      }
    }
  }
}
