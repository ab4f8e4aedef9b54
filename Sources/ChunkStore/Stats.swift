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
