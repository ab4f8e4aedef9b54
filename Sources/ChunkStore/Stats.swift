import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

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
  /// Stored bytes of all chunks. The writer keeps a running total (it is the only process that
  /// changes it), so the online budget check after each commit is not a scan of the chunks.
  public func storedBytes() throws(ChunkStoreError) -> UInt64 {
    if isWriter, let total = bookkeeping.withLock({ $0.storedTotal }) { return total }
    let total: UInt64 = try wrap("stored bytes") {
      try withReader { db in try db.sumStoredBytes() }
    }
    if isWriter { bookkeeping.withLock { $0.storedTotal = total } }
    return total
  }

  /// Adjusts the running total after a committed change (nil total: recomputed when next asked).
  func adjustStored(adding: UInt64 = 0, removing: UInt64 = 0) {
    bookkeeping.withLock {
      guard let t = $0.storedTotal else { return }
      $0.storedTotal = t + adding - min(t + adding, removing)
    }
  }

  func forgetStoredTotal() { bookkeeping.withLock { $0.storedTotal = nil } }

  public func stats() throws(ChunkStoreError) -> StoreStats {
    try wrap("stats") {
      try withReader { db in
        var st = try db.counts()
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
