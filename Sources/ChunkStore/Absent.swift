import Foundation
import NixFormats

extension ChunkStore {
  /// Where an absent chunk of a cached layout is now, if it has been stored since.
  func presentLocation(_ loc: ChunkLocation) throws(ChunkStoreError) -> ChunkLocation? {
    try wrap("chunk") {
      try withReader { db in try db.presentLocation(loc) }
    }
  }

  /// The chunks of `content` that are not here, among those holding bytes
  /// [offset, offset + count + ahead): what a read there must fetch (with read-ahead).
  public func absentChunks(content: ContentID, offset: UInt64, count: Int, ahead: Int = 0) throws(ChunkStoreError) -> [ChunkRef] {
    try gcLock.read { () throws(ChunkStoreError) -> [ChunkRef] in
      let layout = try self.layout(content)
      let from = offset + layout.skip
      let to = min(layout.skip + layout.size, from + UInt64(count) + UInt64(ahead))
      var out: [ChunkRef] = []
      for (loc, start) in zip(layout.chunks, layout.starts) where loc.codec == .absent {
        guard start < to, start + UInt64(loc.size) > from else { continue }
        if chunkCache.get(loc.id) != nil || arriving.bytes(loc.id) != nil { continue }
        if try presentLocation(loc) != nil { continue }
        out.append(ChunkRef(id: loc.id, size: UInt32(loc.size)))
      }
      return out
    }
  }

  /// Those of `refs` that a path here knows but lacks (anything else is never fetched for it).
  public func absentAmong(_ refs: [ChunkRef]) -> [ChunkRef] {
    (try? withReader { db in
      try refs.filter { ref in
        guard try db.isAbsentChunk(ref) else { return false }
        return chunkCache.get(ref.id) == nil && arriving.bytes(ref.id) == nil
      }
    }) ?? []
  }

  /// Every chunk a partial path still lacks (for `nixfs fetch`, which completes it).
  public func absentChunks(of path: StorePath) throws(ChunkStoreError) -> [ChunkRef] {
    guard let tree = try servableTree(of: path) else { throw .notComplete(storePath: path.path) }
    var seen: Set<ChunkID> = []
    var out: [ChunkRef] = []
    for (content, size) in tree.contents where size > 0 {
      for ref in try absentChunks(content: content, offset: 0, count: Int(size)) where seen.insert(ref.id).inserted {
        out.append(ref)
      }
    }
    return out
  }
}
