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

extension ChunkStore {
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

  /// How many paths GC has evicted since this store was opened: callers that cache trees check it
  /// to notice that a path they hold may be gone.
  public var evictions: UInt64 { evictionCount.load(ordering: .acquiring) }
}
