import Foundation

// The index layer's aggregate queries, for the running total of stored bytes and `stats`.
extension Database {
  /// Stored bytes of all chunks.
  func sumStoredBytes() throws(ChunkStoreError) -> UInt64 {
    let s = try prepare("SELECT COALESCE(SUM(stored), 0) FROM chunks")
    _ = try s.step()
    return UInt64(s.int(0))
  }

  /// Every figure of `StoreStats` the index holds (not the bytes on disk).
  func counts() throws(ChunkStoreError) -> StoreStats {
    var st = StoreStats()
    let p = try prepare(
      "SELECT COUNT(*), COALESCE(SUM(files), 0), COALESCE(SUM(nar_size), 0), COALESCE(SUM(file_bytes), 0) FROM paths WHERE state = 1")
    _ = try p.step()
    (st.paths, st.files, st.narBytes, st.logicalBytes) = (Int(p.int(0)), Int(p.int(1)), UInt64(p.int(2)), UInt64(p.int(3)))
    st.incompletePaths = try countPaths(state: ChunkStore.PathState.incomplete.rawValue)
    st.partialPaths = try countPaths(state: ChunkStore.PathState.partial.rawValue)
    let ab = try prepare("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks WHERE codec = 2")
    _ = try ab.step()
    (st.absentChunks, st.absentBytes) = (Int(ab.int(0)), UInt64(ab.int(1)))
    let c = try prepare("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM contents")
    _ = try c.step()
    (st.contents, st.uniqueContentBytes) = (Int(c.int(0)), UInt64(c.int(1)))
    let k = try prepare(
      "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(stored), 0), COALESCE(SUM(pack IS NULL), 0) FROM chunks WHERE codec != 2")
    _ = try k.step()
    (st.chunks, st.chunkBytes, st.storedBytes, st.inlineChunks) = (Int(k.int(0)), UInt64(k.int(1)), UInt64(k.int(2)), Int(k.int(3)))
    let n = try prepare("SELECT COUNT(*) FROM packs")
    _ = try n.step()
    st.packs = Int(n.int(0))
    return st
  }
}
