internal import Crypto
import Foundation

/// A 256-bit digest held as four words, so it hashes and compares cheaply as a dictionary key.
/// Chunks and file contents are named by their uncompressed bytes (see `ChunkID`, `ContentID`), so
/// the same bytes get the same name on every node: that is what lets chunks and manifests travel.
public struct SHA256Digest: Hashable, Comparable, Sendable, CustomStringConvertible {
  public let w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

  public init(bytes: some Collection<UInt8>) {
    precondition(bytes.count == 32, "a SHA-256 digest is 32 bytes")
    var words = [UInt64](repeating: 0, count: 4)
    for (i, b) in bytes.enumerated() { words[i / 8] = words[i / 8] << 8 | UInt64(b) }
    (w0, w1, w2, w3) = (words[0], words[1], words[2], words[3])
  }

  init(_ digest: SHA256.Digest) {
    // Straight from the digest's bytes: this runs once per chunk, so no intermediate arrays.
    self = digest.withUnsafeBytes { SHA256Digest(raw: $0) }
  }

  /// From 32 big-endian bytes.
  init(raw b: UnsafeRawBufferPointer) {
    precondition(b.count == 32, "a SHA-256 digest is 32 bytes")
    w0 = UInt64(bigEndian: b.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
    w1 = UInt64(bigEndian: b.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    w2 = UInt64(bigEndian: b.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
    w3 = UInt64(bigEndian: b.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
  }

  public static func of(_ bytes: UnsafeRawBufferPointer) -> SHA256Digest {
    SHA256Digest(SHA256.hash(data: bytes))
  }

  public static func of(_ bytes: [UInt8]) -> SHA256Digest {
    bytes.withUnsafeBytes { of($0) }
  }

  /// Big-endian bytes, the usual written order of a SHA-256 digest.
  public var bytes: [UInt8] {
    var out = [UInt8]()
    out.reserveCapacity(32)
    for w in [w0, w1, w2, w3] {
      for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: w >> UInt64(shift))) }
    }
    return out
  }

  public var hex: String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(64)
    for b in bytes {
      out.append(digits[Int(b >> 4)])
      out.append(digits[Int(b & 0xf)])
    }
    return String(decoding: out, as: UTF8.self)
  }

  public init?(hex: String) {
    let chars = Array(hex.utf8)
    guard chars.count == 64 else { return nil }
    var out = [UInt8]()
    for i in stride(from: 0, to: 64, by: 2) {
      guard let b = UInt8(String(decoding: chars[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
      out.append(b)
    }
    self.init(bytes: out)
  }

  public var description: String { hex }

  /// One word is enough: digest bits are uniform, and Hasher is seeded per process. Hashing all
  /// four words showed up in the commit of paths with many files (several dictionaries per file).
  public func hash(into hasher: inout Hasher) { hasher.combine(w0) }

  public static func == (a: SHA256Digest, b: SHA256Digest) -> Bool {
    a.w0 == b.w0 && a.w1 == b.w1 && a.w2 == b.w2 && a.w3 == b.w3
  }

  public static func < (a: SHA256Digest, b: SHA256Digest) -> Bool {
    (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
  }
}

extension SHA256Digest: Codable {
  public init(from decoder: any Decoder) throws {
    let text = try decoder.singleValueContainer().decode(String.self)
    guard let d = SHA256Digest(hex: text) else {
      throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a hex SHA-256: \(text)"))
    }
    self = d
  }

  public func encode(to encoder: any Encoder) throws {
    var c = encoder.singleValueContainer()
    try c.encode(hex)
  }
}

extension SHA256Digest: CodingKeyRepresentable {
  public var codingKey: any CodingKey { HexKey(stringValue: hex) }
  public init?<T: CodingKey>(codingKey: T) { self.init(hex: codingKey.stringValue) }
  struct HexKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
  }
}

/// What a chunk's name and a content's name share: a SHA-256-sized digest, hashed, ordered and
/// written (hex, in JSON and as a dictionary key) as the digest. Two types, not one, so that a
/// content's name cannot be passed where a chunk's is meant, or the other way round.
public protocol DigestName: Hashable, Comparable, Sendable, CustomStringConvertible, Codable, CodingKeyRepresentable {
  var digest: SHA256Digest { get }
  init(_ digest: SHA256Digest)
}

extension DigestName {
  public init(bytes: some Collection<UInt8>) { self.init(SHA256Digest(bytes: bytes)) }

  public init?(hex: String) {
    guard let d = SHA256Digest(hex: hex) else { return nil }
    self.init(d)
  }

  /// Named by the SHA-256 of these bytes.
  public static func of(_ bytes: UnsafeRawBufferPointer) -> Self { Self(SHA256Digest.of(bytes)) }
  public static func of(_ bytes: [UInt8]) -> Self { Self(SHA256Digest.of(bytes)) }

  public var bytes: [UInt8] { digest.bytes }
  public var hex: String { digest.hex }
  public var description: String { digest.hex }

  public func hash(into hasher: inout Hasher) { digest.hash(into: &hasher) }
  public static func == (a: Self, b: Self) -> Bool { a.digest == b.digest }
  public static func < (a: Self, b: Self) -> Bool { a.digest < b.digest }

  // These defaults take precedence over synthesis: the JSON form stays the digest's hex string.
  public init(from decoder: any Decoder) throws { self.init(try SHA256Digest(from: decoder)) }
  public func encode(to encoder: any Encoder) throws { try digest.encode(to: encoder) }
  public var codingKey: any CodingKey { digest.codingKey }
  public init?<T: CodingKey>(codingKey: T) {
    guard let d = SHA256Digest(codingKey: codingKey) else { return nil }
    self.init(d)
  }
}

/// The name of a chunk: SHA-256 of its uncompressed bytes.
public struct ChunkID: DigestName {
  public let digest: SHA256Digest
  public init(_ digest: SHA256Digest) { self.digest = digest }
}

/// The name of a regular file's whole content; identical files in different store paths share it,
/// so the filesystem can give them one inode. A file of one chunk (or a small file packed with
/// others) is named by the SHA-256 of its bytes; a file of several chunks by `ofChunkList`.
public struct ContentID: DigestName {
  public let digest: SHA256Digest
  public init(_ digest: SHA256Digest) { self.digest = digest }

  /// The name of a file that is this one chunk: the same SHA-256.
  public init(chunk: ChunkID) { digest = chunk.digest }

  /// The content ID of a file cut into several chunks: a hash list over the chunks' sizes and
  /// digests in order, so it commits to every byte and a receiver of a manifest checks it from the
  /// chunk list alone. Hashing the file's bytes a second time, in order, on the thread that reads
  /// the NAR, was a fifth of the ingest's wall time. It is SHA-512 cut to 256 bits, not SHA-256:
  /// a small file whose bytes spell out some chunk list must not get that list's name.
  public static func ofChunkList(_ chunks: some Sequence<ChunkRef>) -> ContentID {
    var h = SHA512()
    h.update(data: Array("nixfs chunk list 1\n".utf8))
    for c in chunks {
      let d = c.id.digest
      withUnsafeBytes(of: c.size.littleEndian) { h.update(bufferPointer: $0) }
      withUnsafeBytes(of: (d.w0.bigEndian, d.w1.bigEndian, d.w2.bigEndian, d.w3.bigEndian)) {
        h.update(bufferPointer: $0)
      }
    }
    return ContentID(h.finalize().withUnsafeBytes { SHA256Digest(raw: UnsafeRawBufferPointer(rebasing: $0[0..<32])) })
  }
}
