import Foundation
import NixFormats

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
