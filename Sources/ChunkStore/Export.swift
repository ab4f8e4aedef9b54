import Foundation
import NixFormats
import SystemCalls

extension ChunkStore {
  /// Writes the NAR of a complete path (byte-identical to what was ingested) to `sink`, checking
  /// on the way that it still hashes to the recorded NarHash.
  public func dump(_ path: StorePath, to sink: ([UInt8]) throws -> Void) throws {
    guard let m = try tree(of: path) else { throw ChunkStoreError.notComplete(storePath: path.path) }
    pin(path)
    defer { unpin(path) }
    var writer = NARWriter()
    var hasher = NixHasher()
    func drain() throws {
      let out = writer.take()
      out.withUnsafeBytes { hasher.update($0) }
      try sink(out)
    }
    try m.replay(
      { event in
        try writer.write(event)
        if writer.output.count >= 1 << 20 { try drain() }
      },
      content: { content, _, emit in try forEachPiece(of: content, emit) })
    try drain()
    let got = hasher.finalize()
    if got != m.info.narHash || hasher.byteCount != m.info.narSize {
      throw ChunkStoreError.narHashMismatch(storePath: path.path, expected: m.info.narHash.nix32, actual: got.nix32)
    }
  }
}

extension ChunkStore {
  /// Writes a file content's plain bytes to `fd` (a backing file for FUSE passthrough), each
  /// chunk checked against its digest on the way: the copy holds exactly what the manifest named.
  /// Throws `chunkAbsent` for a partial file. Returns the byte count, which is the content's size.
  public func writeVerified(content: ContentID, to fd: Int32, path: String) throws(ChunkStoreError) -> UInt64 {
    try gcLock.read { () throws(ChunkStoreError) -> UInt64 in
      let layout = try self.layout(content)
      let end = layout.skip + layout.size
      var written: UInt64 = 0
      for (loc, start) in zip(layout.chunks, layout.starts) where start < end {
        let bytes = try chunkBytes(loc)
        guard SHA256Digest.of(bytes) == loc.id.digest else {
          throw .chunkCorrupt(chunk: loc.id, pack: loc.pack ?? 0, offset: loc.offset, reason: "does not hash to its name")
        }
        let from = Int(max(layout.skip, start) - start)
        let to = Int(min(end - start, UInt64(bytes.count)))
        guard from <= to else { continue }
        let failure: SystemCallError? = bytes.withUnsafeBytes { b in
          do throws(SystemCallError) {
            try writeAll(fd, b.baseAddress! + from, to - from)
            return nil
          } catch { return error }
        }
        if let failure { throw .io(path: path, operation: "write", errno: failure.errno) }
        written += UInt64(to - from)
      }
      guard written == layout.size else {
        throw .chunkMissing(chunk: nil, content: content)
      }
      return written
    }
  }
}
