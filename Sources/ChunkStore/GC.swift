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
        return try db.pathsByLastAccess().filter { !pinned.contains($0.path) }
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
        return try db.servablePathRow(path.path)
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
            guard let nodes = try db.servableTree(row: row) else { return false }
            var multiplicity: [ContentID: Int] = [:]
            for n in nodes { if case .regular(let c, _, _) = n.kind { multiplicity[c, default: 0] += 1 } }
            for (content, m) in multiplicity {
              guard let (contentRow, refs) = try db.contentRefs(content) else { continue }
              if refs > Int64(m) {
                try db.dropContentRefs(row: contentRow, by: m)
                continue
              }
              deadContents.append(content)
              let chunkRows = try db.chunkRows(ofContent: contentRow)
              try db.deleteContent(row: contentRow)
              for chunkRow in chunkRows {
                guard let q = try db.releaseChunk(row: chunkRow), q.refs <= 0, let d = q.digest, !isBorrowed(d) else { continue }
                if let pack = q.pack { freedRanges.append((pack, q.offset, q.stored)) }
                freed += q.stored
                try db.deleteChunk(row: chunkRow)
              }
            }
            if keepAsIncomplete {
              try db.markIncomplete(row: row)
            } else {
              try db.deletePath(row: row)
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
