import Foundation
import NixFormats
import Synchronization

/// One NAR download's verification pipeline: compressed bytes → FileHash/FileSize → decompressor →
/// NarHash/NarSize + strict NAR parse → sink. It survives across attempts, so a download resumed
/// with a Range request continues the same decompressor and hashers from the byte it stopped at.
/// Used by one transport thread at a time.
final class NARDownload: @unchecked Sendable {
  let info: NarInfo
  let url: String
  let sink: any NARSink
  private var fileHasher = NixHasher()
  private var narHasher = NixHasher()
  /// Decompressed bytes handed to the sink since the last restart.
  private var delivered: UInt64 = 0
  /// The sink hashes what it gets: do not hash it here too.
  private let sinkHashes: Bool
  /// The sink parses what it gets: do not parse it here too.
  private let sinkParses: Bool
  private var decompressor: any Decompressor
  private var reader: NARReader
  /// Whether FileHash needs its own hasher: uncompressed, it is the NarHash over the same bytes.
  private let hashFile: Bool
  /// Compressed bytes received and accepted so far: where a resumed request starts.
  private(set) var received: UInt64 = 0
  private(set) var restarts = 0
  private(set) var resumes = 0
  /// The sink holds bytes from an earlier download (another substituter): reset it first.
  var pendingReset: Bool

  init(info: NarInfo, url: String, sink: any NARSink, sinkHasData: Bool = false) throws(CacheError) {
    self.pendingReset = sinkHasData
    guard let d = Decompressors.make(info.compression) else {
      throw .unsupportedCompression(url: url, compression: info.compression.description)
    }
    self.info = info
    self.url = url
    self.sink = sink
    self.decompressor = d
    self.reader = NARReader(totalSize: info.narSize)
    self.hashFile = info.fileHash != nil && !(info.compression == .none && info.fileHash == info.narHash)
    self.sinkHashes = sink.computesNARHash
    self.sinkParses = sink.parsesNAR
  }

  /// Back to byte 0: fresh state, and the sink forgets what it got.
  func restart() throws(CacheError) {
    let ours = received > 0 || delivered > 0
    guard ours || pendingReset else { return }
    if ours { restarts += 1 }
    pendingReset = false
    fileHasher = NixHasher()
    narHasher = NixHasher()
    delivered = 0
    decompressor = Decompressors.make(info.compression)!
    reader = NARReader(totalSize: info.narSize)
    received = 0
    do { try sink.reset() } catch { throw .sink(url: url, error: error) }
  }

  /// A response is starting; `requested` is the offset we asked for.
  func start(_ head: ResponseHead, requested: UInt64) throws {
    if requested == 0 {
      try restart()
      return
    }
    if head.status == 206 {
      // Only continue when the server resumed exactly where we stopped.
      let range = head.contentRange ?? ""
      guard let start = Self.rangeStart(range), start == requested else {
        throw CacheError.badRange(url: url, requestedOffset: requested, contentRange: range)
      }
      resumes += 1
    } else {
      // The server ignored the Range header and sends everything: start over.
      try restart()
    }
  }

  static func rangeStart(_ header: String) -> UInt64? {
    // "bytes START-END/TOTAL"
    guard header.hasPrefix("bytes ") else { return nil }
    let spec = header.dropFirst(6)
    guard let dash = spec.firstIndex(of: "-") else { return nil }
    return UInt64(spec[..<dash])
  }

  /// The most compressed bytes a NAR of `narSize` may take: no codec we accept comes near
  /// doubling incompressible data, so anything past this is padding (endless zstd skippable frames,
  /// xz stream padding) from a cache that means to keep us downloading. FileSize, when given, is
  /// unsigned too, so it bounds a download only below this.
  static func compressedLimit(narSize: UInt64, compression: NarInfo.Compression) -> UInt64 {
    if compression == .none { return narSize }
    let (doubled, overflow) = narSize.multipliedReportingOverflow(by: 2)
    return overflow ? UInt64.max : doubled &+ (1 << 20)
  }

  func consume(_ bytes: UnsafeRawBufferPointer) throws {
    let total = received + UInt64(bytes.count)
    if let size = info.fileSize, total > size {
      throw CacheError.sizeMismatch(url: url, field: "FileSize", expected: size, actual: total)
    }
    let limit = Self.compressedLimit(narSize: info.narSize, compression: info.compression)
    if total > limit {
      let field = info.compression == .none ? "NarSize (Compression: none)" : "compressed size limit (2 × NarSize + 1 MiB)"
      throw CacheError.sizeMismatch(url: url, field: field, expected: limit, actual: total)
    }
    if hashFile { fileHasher.update(bytes) }
    do {
      try decompressor.feed(bytes) { try deliver($0) }
    } catch let e as DecompressionError {
      throw CacheError.decompression(url: url, compression: info.compression.description, reason: e.reason)
    }
    received = total
  }

  private func deliver(_ piece: UnsafeRawBufferPointer) throws {
    if delivered + UInt64(piece.count) > info.narSize {
      throw CacheError.sizeMismatch(url: url, field: "NarSize", expected: info.narSize, actual: delivered + UInt64(piece.count))
    }
    if !sinkHashes { narHasher.update(piece) }
    if !sinkParses {
      do {
        try reader.feed(piece) { _ in }
      } catch let e as NARError {
        throw CacheError.invalidNAR(url: url, error: e)
      }
    }
    do { try sink.write(piece) } catch {
      if let nar = (error as? NARError) ?? (error as? any NARParseFailure)?.narError {
        throw CacheError.invalidNAR(url: url, error: nar)
      }
      throw CacheError.sink(url: url, error: error)
    }
    delivered += UInt64(piece.count)
  }

  /// Whether the sink has been given bytes of this download.
  var touchedSink: Bool { delivered > 0 }

  /// All bytes are in: verify sizes and hashes. Throws `CacheError`.
  func finish() throws {
    do {
      try decompressor.finish { try deliver($0) }
    } catch let e as DecompressionError {
      throw CacheError.decompression(url: url, compression: info.compression.description, reason: e.reason)
    }
    if let size = info.fileSize, received != size {
      throw CacheError.sizeMismatch(url: url, field: "FileSize", expected: size, actual: received)
    }
    if hashFile, let expected = info.fileHash {
      // Only sha256 is computed; narinfos from Nix always use it.
      if expected.algorithm == .sha256 {
        let actual = fileHasher.finalize()
        if actual != expected { throw CacheError.hashMismatch(url: url, field: "FileHash", expected: expected, actual: actual) }
      }
    }
    if delivered != info.narSize {
      throw CacheError.sizeMismatch(url: url, field: "NarSize", expected: info.narSize, actual: delivered)
    }
    guard let actual = sinkHashes ? sink.writtenNARHash() : narHasher.finalize() else {
      throw CacheError.sink(url: url, error: MissingSinkHash())
    }
    if actual != info.narHash {
      throw CacheError.hashMismatch(url: url, field: "NarHash", expected: info.narHash, actual: actual)
    }
    if !sinkParses {
      do { try reader.finish() } catch let e as NARError { throw CacheError.invalidNAR(url: url, error: e) }
    }
  }

}
