import Foundation

#if canImport(Glibc)
  import Glibc
#endif

extension ChunkStore {
  struct ChunkLocation: Sendable {
    let rowID: Int64
    let id: ChunkID
    let size: Int
    let stored: Int
    let codec: Codec
    let pack: Int64?
    let offset: UInt64
  }

  struct ContentLayout: Sendable {
    let size: UInt64
    /// The content is bytes [skip, skip + size) of its chunks laid end to end: skip is non-zero
    /// only for a small file packed into a shared chunk.
    let skip: UInt64
    /// Start offset of each chunk in that concatenation, ascending.
    let starts: [UInt64]
    let chunks: [ChunkLocation]

    /// As a manifest lists it.
    var refs: [ChunkRef] { chunks.map { ChunkRef(id: $0.id, size: UInt32($0.size)) } }
    var slice: UInt32? { Manifest.slice(skip: skip, size: size, of: chunks.reduce(0) { $0 + UInt64($1.size) }) }
  }

  func layout(_ content: ContentID) throws(ChunkStoreError) -> ContentLayout {
    if let l = layouts.withLock({ $0[content] }) { return l }
    let l: ContentLayout
    do {
      l = try withReader { db in try db.contentLayout(content, hasSkip: hasSkipColumn) }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "layout", message: "\(error)") }
    layouts.withLock { layouts in
      // Crude bound: layouts are small, and dropping them all costs only re-reading the index.
      if layouts.count >= 65536 { layouts.removeAll(keepingCapacity: true) }
      layouts[content] = l
    }
    return l
  }

  /// The uncompressed bytes of one chunk, from the cache or from disk. Not re-hashed on the hot
  /// path (fsck verifies every chunk).
  func chunkBytes(_ loc: ChunkLocation) throws(ChunkStoreError) -> [UInt8] {
    if let b = chunkCache.get(loc.id) { return b }
    if loc.codec == .absent {
      if let b = arriving.bytes(loc.id) { return b }
      // Fetched since this layout was cached?
      guard let now = try presentLocation(loc) else { throw .chunkAbsent(chunk: loc.id, size: loc.size) }
      return try chunkBytes(now)
    }
    let stored: [UInt8]
    if let pack = loc.pack {
      let fd = try packFD(pack)
      guard let b = preadFully(fd, count: loc.stored, offset: loc.offset), b.count == loc.stored else {
        throw .chunkCorrupt(chunk: loc.id, pack: pack, offset: loc.offset, reason: "short read")
      }
      // The reader's page cache (FUSE, keep_cache) and the chunk cache hold these bytes now; the
      // compressed pack pages would be a second copy in the page cache. Readahead beyond stays.
      _ = posix_fadvise(fd, off_t(loc.offset), off_t(loc.stored), POSIX_FADV_DONTNEED)
      stored = b
    } else {
      do {
        stored = try withReader { db -> [UInt8] in
          guard let b = try db.inlineChunkData(row: loc.rowID) else {
            throw ChunkStoreError.chunkCorrupt(chunk: loc.id, pack: 0, offset: 0, reason: "inline data missing")
          }
          return b
        }
      } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "chunk", message: "\(error)") }
    }
    let raw: [UInt8]
    switch loc.codec {
    case .raw: raw = stored
    case .zstd:
      guard let r = decompress(stored, rawSize: loc.size) else {
        throw .chunkCorrupt(chunk: loc.id, pack: loc.pack ?? 0, offset: loc.offset, reason: "zstd decompression failed")
      }
      raw = r
    case .absent: throw .chunkAbsent(chunk: loc.id, size: loc.size)
    }
    guard raw.count == loc.size else {
      throw .chunkCorrupt(chunk: loc.id, pack: loc.pack ?? 0, offset: loc.offset, reason: "wrong size")
    }
    chunkCache.put(loc.id, raw)
    return raw
  }

  /// Reads up to `buffer.count` bytes of a file content at `offset` into `buffer`; returns the
  /// count (short only at the end of the content).
  public func read(content: ContentID, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ChunkStoreError) -> Int {
    try gcLock.read { () throws(ChunkStoreError) -> Int in
      let layout = try self.layout(content)
      if offset > layout.size { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
      let want = Int(min(UInt64(buffer.count), layout.size - offset))
      guard want > 0 else { return 0 }
      let at = offset + layout.skip
      // Last chunk starting at or before the offset.
      var lo = 0
      var hi = layout.starts.count
      while hi - lo > 1 {
        let mid = (lo + hi) / 2
        if layout.starts[mid] <= at { lo = mid } else { hi = mid }
      }
      var done = 0
      var i = lo
      while done < want {
        guard i < layout.chunks.count else { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
        let bytes = try chunkBytes(layout.chunks[i])
        let pos = Int(at + UInt64(done) - layout.starts[i])
        guard pos < bytes.count else { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
        let n = min(bytes.count - pos, want - done)
        bytes.withUnsafeBytes { src in
          (buffer.baseAddress! + done).copyMemory(from: src.baseAddress! + pos, byteCount: n)
        }
        done += n
        i += 1
      }
      return done
    }
  }

  public func read(content: ContentID, offset: UInt64, count: Int) throws(ChunkStoreError) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var n = 0
    do { n = try out.withUnsafeMutableBytes { try read(content: content, offset: offset, into: $0) } } catch let e as ChunkStoreError {
      throw e
    } catch { preconditionFailure("read throws only ChunkStoreError") }
    out.removeLast(count - n)
    return out
  }

  /// Streams a file content's bytes, chunk by chunk.
  /// Holds off GC for the duration, so no chunk of the layout is freed under it.
  public func forEachPiece(of content: ContentID, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
    try gcLock.read { () throws in
      let layout = try self.layout(content)
      let end = layout.skip + layout.size
      for (loc, start) in zip(layout.chunks, layout.starts) where start < end {
        let bytes = try chunkBytes(loc)
        // Only this content's part of a shared chunk.
        let from = Int(max(layout.skip, start) - start)
        let to = Int(min(end - start, UInt64(bytes.count)))
        guard from <= to else { continue }
        try bytes.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[from..<to])) }
      }
    }
  }

  func dropLayouts() { layouts.withLock { $0.removeAll() } }

  func invalidate(contents: [ContentID]) {
    layouts.withLock { layouts in for c in contents { layouts[c] = nil } }
  }
}
