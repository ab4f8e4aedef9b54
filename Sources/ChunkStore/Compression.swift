internal import CZstd
import Foundation

/// How a chunk's bytes are kept.
enum Codec: Int64 {
  case raw = 0
  case zstd = 1
  /// Known from a verified chunk index but not fetched yet (a partial path's): no bytes here.
  case absent = 2
}

/// Compresses with zstd; returns nil when compression saves less than 1/32 of the size, in which
/// case the chunk is stored raw (random or already-compressed data).
func compress(_ src: UnsafeRawBufferPointer, level: Int32, context: OpaquePointer) -> [UInt8]? {
  let bound = ZSTD_compressBound(src.count)
  let out = [UInt8](unsafeUninitializedCapacity: bound) { buf, n in
    let r = ZSTD_compressCCtx(context, buf.baseAddress, bound, src.baseAddress, src.count, level)
    n = ZSTD_isError(r) != 0 ? 0 : r
  }
  if out.isEmpty || out.count >= src.count - src.count / 32 { return nil }
  return out
}

func decompress(_ src: [UInt8], rawSize: Int) -> [UInt8]? {
  var ok = false
  let out = [UInt8](unsafeUninitializedCapacity: rawSize) { buf, n in
    let r = src.withUnsafeBytes { ZSTD_decompress(buf.baseAddress, rawSize, $0.baseAddress, src.count) }
    ok = ZSTD_isError(r) == 0 && r == rawSize
    n = ok ? rawSize : 0
  }
  return ok ? out : nil
}
