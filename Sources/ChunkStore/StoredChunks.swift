import Foundation
import Synchronization

/// One chunk as the store keeps it: zstd-compressed or raw, its uncompressed size, and how many
/// bytes it takes stored.
public struct StoredChunk: Sendable {
  public let size: Int
  public let zstd: Bool
  public let storedSize: Int
}

/// Where a chunk's stored bytes are, for `nixfs serve`'s chunk endpoint: one index query per chunk
/// was most of a request's cost, so locations are kept, and forgotten whenever GC ran.
final class ChunkLocations: Sendable {
  struct Location: Sendable {
    let chunk: StoredChunk
    let pack: Int64?
    let offset: UInt64
    /// Inline chunks (small, in the index): their bytes.
    let inline: [UInt8]?
  }
  static let limit = 1 << 18
  private let state = Mutex<(writes: UInt64, map: [ChunkID: Location])>((0, [:]))

  func get(_ id: ChunkID, writes: UInt64) -> Location? {
    state.withLock { s in
      if s.writes != writes {
        s.map.removeAll(keepingCapacity: true)
        s.writes = writes
      }
      return s.map[id]
    }
  }

  func put(_ id: ChunkID, _ location: Location, writes: UInt64) {
    state.withLock { s in
      guard s.writes == writes else { return }
      if s.map.count >= Self.limit { s.map.removeAll(keepingCapacity: true) }
      s.map[id] = location
    }
  }
}

extension ChunkStore {
  /// Hands the stored bytes of the chunk with this digest, as kept on disk, to `body`, which is
  /// given the chunk's facts and a function that fills a buffer of `storedSize` bytes (so the
  /// bytes go straight into the caller's buffer). Nil when the store has no such chunk. GC cannot
  /// free the chunk while `body` runs.
  public func withStoredChunk<R>(
    _ id: ChunkID, _ body: (StoredChunk, (UnsafeMutableRawBufferPointer) throws -> Void) throws -> R
  ) throws -> R? {
    try gcLock.read { () throws -> R? in
      let writes = gcLock.writes.load(ordering: .relaxed)
      let location: ChunkLocations.Location
      if let cached = chunkLocations.get(id, writes: writes) {
        location = cached
      } else {
        guard let found = try locateChunk(id) else { return nil }
        chunkLocations.put(id, found, writes: writes)
        location = found
      }
      return try body(location.chunk) { buffer in
        guard buffer.count == location.chunk.storedSize else {
          throw ChunkStoreError.chunkCorrupt(chunk: id, pack: location.pack ?? 0, offset: location.offset, reason: "wrong buffer size")
        }
        if let inline = location.inline {
          inline.withUnsafeBytes { buffer.copyMemory(from: $0) }
          return
        }
        let fd = try packFD(location.pack!)
        guard preadFully(fd, into: buffer, offset: location.offset) else {
          throw ChunkStoreError.chunkCorrupt(chunk: id, pack: location.pack!, offset: location.offset, reason: "short read")
        }
      }
    }
  }

  private func locateChunk(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocations.Location? {
    do {
      return try withReader { db in try db.storedChunk(id) }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "chunk", message: "\(error)") }
  }
}
