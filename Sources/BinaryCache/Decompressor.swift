import CBzip2
import CLzma
import CZstd
import NixFormats

/// A streaming decompressor: compressed pieces in, decompressed pieces out through `emit`,
/// with constant memory whatever the stream's size.
protocol Decompressor: AnyObject {
  /// Decompresses `input`, calling `emit` with each piece of output (valid only during the call).
  func feed(_ input: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws
  /// After the last input: throws unless the compressed stream ended exactly.
  func finish(_ emit: (UnsafeRawBufferPointer) throws -> Void) throws
}

/// Why decompression failed; the caller adds the URL.
struct DecompressionError: Error {
  let reason: String
}

enum Decompressors {
  static func make(_ compression: NarInfo.Compression) -> (any Decompressor)? {
    switch compression {
    case .none: PassThrough()
    case .zstd: ZstdDecompressor()
    case .xz: XzDecompressor()
    case .bzip2: Bzip2Decompressor()
    case .br, .other: nil
    }
  }
}

/// Output buffer size: large enough that the per-call overhead vanishes, small enough for L2.
private let outputSize = 256 << 10

final class PassThrough: Decompressor {
  func feed(_ input: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    if input.count > 0 { try emit(input) }
  }
  func finish(_ emit: (UnsafeRawBufferPointer) throws -> Void) throws {}
}

final class ZstdDecompressor: Decompressor {
  let stream: OpaquePointer
  let output = UnsafeMutableRawBufferPointer.allocate(byteCount: outputSize, alignment: 16)
  /// zstd's last return value: 0 exactly when a frame has been fully decoded and flushed.
  var lastHint = 1
  var sawInput = false

  init() {
    stream = ZSTD_createDStream()
    ZSTD_initDStream(stream)
  }

  deinit {
    ZSTD_freeDStream(stream)
    output.deallocate()
  }

  func feed(_ input: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    guard input.count > 0 else { return }
    sawInput = true
    var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
    // Loop until all input is consumed and zstd has no more output pending for it.
    while true {
      var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
      let r = ZSTD_decompressStream(stream, &outBuffer, &inBuffer)
      if ZSTD_isError(r) != 0 { throw DecompressionError(reason: String(cString: ZSTD_getErrorName(r))) }
      lastHint = r
      if outBuffer.pos > 0 { try emit(UnsafeRawBufferPointer(start: output.baseAddress, count: outBuffer.pos)) }
      if inBuffer.pos == inBuffer.size && outBuffer.pos < outBuffer.size { break }
    }
  }

  func finish(_ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    guard sawInput && lastHint == 0 else { throw DecompressionError(reason: "the zstd stream ends early") }
  }
}

final class XzDecompressor: Decompressor {
  var stream = nixfs_lzma_stream_init()
  let output = UnsafeMutableRawBufferPointer.allocate(byteCount: outputSize, alignment: 16)
  var ended = false
  var initError: lzma_ret

  init() {
    // LZMA_CONCATENATED: accept concatenated .xz streams, as xz(1) does.
    initError = lzma_stream_decoder(&stream, UInt64.max, nixfs_lzma_concatenated())
  }

  deinit {
    lzma_end(&stream)
    output.deallocate()
  }

  func run(_ input: UnsafeRawBufferPointer, action: lzma_action, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    guard initError == LZMA_OK else { throw DecompressionError(reason: "cannot initialise liblzma (\(initError.rawValue))") }
    if ended {
      if input.count > 0 { throw DecompressionError(reason: "bytes after the end of the xz stream") }
      return
    }
    stream.next_in = input.baseAddress?.assumingMemoryBound(to: UInt8.self)
    stream.avail_in = input.count
    while true {
      stream.next_out = output.baseAddress!.assumingMemoryBound(to: UInt8.self)
      stream.avail_out = output.count
      let r = lzma_code(&stream, action)
      let produced = output.count - stream.avail_out
      if produced > 0 { try emit(UnsafeRawBufferPointer(start: output.baseAddress, count: produced)) }
      switch r {
      case LZMA_OK: break
      case LZMA_STREAM_END:
        ended = true
        if stream.avail_in > 0 { throw DecompressionError(reason: "bytes after the end of the xz stream") }
        return
      case LZMA_BUF_ERROR where action == LZMA_FINISH:
        throw DecompressionError(reason: "the xz stream ends early")
      case LZMA_DATA_ERROR: throw DecompressionError(reason: "corrupt data")
      case LZMA_FORMAT_ERROR: throw DecompressionError(reason: "not an xz stream")
      case LZMA_OPTIONS_ERROR: throw DecompressionError(reason: "unsupported xz options")
      case LZMA_MEM_ERROR: throw DecompressionError(reason: "out of memory")
      default: throw DecompressionError(reason: "liblzma error \(r.rawValue)")
      }
      if stream.avail_in == 0 && stream.avail_out > 0 && action == LZMA_RUN { return }
    }
  }

  func feed(_ input: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    guard input.count > 0 else { return }
    try run(input, action: LZMA_RUN, emit)
  }

  func finish(_ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    try run(UnsafeRawBufferPointer(start: nil, count: 0), action: LZMA_FINISH, emit)
    if !ended { throw DecompressionError(reason: "the xz stream ends early") }
  }
}

final class Bzip2Decompressor: Decompressor {
  var stream = bz_stream()
  let output = UnsafeMutableRawBufferPointer.allocate(byteCount: outputSize, alignment: 16)
  var ended = false
  let initResult: Int32

  init() {
    initResult = BZ2_bzDecompressInit(&stream, 0, 0)
  }

  deinit {
    if initResult == BZ_OK { BZ2_bzDecompressEnd(&stream) }
    output.deallocate()
  }

  func feed(_ input: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    guard initResult == BZ_OK else { throw DecompressionError(reason: "cannot initialise libbz2 (\(initResult))") }
    guard input.count > 0 else { return }
    if ended { throw DecompressionError(reason: "bytes after the end of the bzip2 stream") }
    stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress!.assumingMemoryBound(to: CChar.self))
    stream.avail_in = UInt32(input.count)
    while true {
      stream.next_out = output.baseAddress!.assumingMemoryBound(to: CChar.self)
      stream.avail_out = UInt32(output.count)
      let r = BZ2_bzDecompress(&stream)
      let produced = output.count - Int(stream.avail_out)
      if produced > 0 { try emit(UnsafeRawBufferPointer(start: output.baseAddress, count: produced)) }
      if r == BZ_STREAM_END {
        ended = true
        if stream.avail_in > 0 { throw DecompressionError(reason: "bytes after the end of the bzip2 stream") }
        return
      }
      guard r == BZ_OK else { throw DecompressionError(reason: "corrupt data (libbz2 error \(r))") }
      if stream.avail_in == 0 && stream.avail_out > 0 { return }
    }
  }

  func finish(_ emit: (UnsafeRawBufferPointer) throws -> Void) throws {
    if !ended { throw DecompressionError(reason: "the bzip2 stream ends early") }
  }
}
