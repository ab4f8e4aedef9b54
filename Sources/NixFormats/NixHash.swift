import Crypto
import Foundation

/// A hash as Nix writes it: `sha256:<nix32>`, `sha256:<hex>`, `sha256:<base64>` or SRI `sha256-<base64>`.
public struct NixHash: Hashable, Sendable, CustomStringConvertible {
  public enum Algorithm: String, Sendable, CaseIterable {
    case md5, sha1, sha256, sha512

    public var digestSize: Int {
      switch self {
      case .md5: 16
      case .sha1: 20
      case .sha256: 32
      case .sha512: 64
      }
    }
  }

  public let algorithm: Algorithm
  public let digest: [UInt8]

  public init(algorithm: Algorithm, digest: [UInt8]) throws(NixHashError) {
    guard digest.count == algorithm.digestSize else {
      throw NixHashError(text: "\(digest.count) bytes", reason: "wrong digest size for \(algorithm)")
    }
    self.algorithm = algorithm
    self.digest = digest
  }

  init(sha256 digest: SHA256.Digest) {
    self.algorithm = .sha256
    self.digest = Array(digest)
  }

  /// Parses any of the forms Nix prints. A bare digest needs `defaultAlgorithm`.
  public init(parsing text: String, defaultAlgorithm: Algorithm? = nil) throws(NixHashError) {
    let algorithm: Algorithm
    let body: Substring
    var sri = false
    if let colon = text.firstIndex(of: ":") {
      guard let a = Algorithm(rawValue: String(text[..<colon])) else {
        throw NixHashError(text: text, reason: "unknown hash algorithm")
      }
      algorithm = a
      body = text[text.index(after: colon)...]
    } else if let dash = text.firstIndex(of: "-"), let a = Algorithm(rawValue: String(text[..<dash])) {
      algorithm = a
      body = text[text.index(after: dash)...]
      sri = true
    } else if let a = defaultAlgorithm {
      algorithm = a
      body = text[...]
    } else {
      throw NixHashError(text: text, reason: "no hash algorithm given")
    }
    let size = algorithm.digestSize
    let decoded: [UInt8]?
    if sri {
      decoded = Data(base64Encoded: String(body)).map(Array.init)
    } else if body.utf8.count == size * 2 {
      decoded = Self.decodeHex(body)
    } else if body.utf8.count == Nix32.encodedLength(byteCount: size) {
      decoded = Nix32.decode(body, byteCount: size)
    } else {
      decoded = Data(base64Encoded: String(body)).map(Array.init)
    }
    guard let digest = decoded, digest.count == size else {
      throw NixHashError(text: text, reason: "not a valid \(algorithm) hash in hex, nix32, or base64")
    }
    self.algorithm = algorithm
    self.digest = digest
  }

  public static func sha256(_ bytes: some DataProtocol) -> NixHash {
    NixHash(sha256: SHA256.hash(data: bytes))
  }

  /// `sha256:<nix32>`, the form narinfos use.
  public var nix32: String { "\(algorithm.rawValue):\(Nix32.encode(digest))" }
  /// The digest alone in Nix32 (as in `nix-hash --base32`).
  public var nix32Digest: String { Nix32.encode(digest) }
  public var hex: String { Self.hexString(digest) }
  public var sri: String { "\(algorithm.rawValue)-\(Data(digest).base64EncodedString())" }
  public var description: String { nix32 }

  static func hexString(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes {
      out.append(digits[Int(b >> 4)])
      out.append(digits[Int(b & 0xf)])
    }
    return String(decoding: out, as: UTF8.self)
  }

  static func decodeHex(_ text: some StringProtocol) -> [UInt8]? {
    func nibble(_ c: UInt8) -> UInt8? {
      switch c {
      case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
      case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
      case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
      default: nil
      }
    }
    let chars = Array(text.utf8)
    guard chars.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    out.reserveCapacity(chars.count / 2)
    var i = 0
    while i < chars.count {
      guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
      out.append(hi << 4 | lo)
      i += 2
    }
    return out
  }
}

public struct NixHashError: Error, Hashable, Sendable, CustomStringConvertible {
  public let text: String
  public let reason: String
  public var description: String { "invalid hash '\(text)': \(reason)" }
}

/// Incremental SHA-256 with the result as a `NixHash`.
public struct NixHasher: Sendable {
  var inner = SHA256()
  public private(set) var byteCount: UInt64 = 0
  public init() {}
  public mutating func update(_ bytes: UnsafeRawBufferPointer) {
    inner.update(bufferPointer: bytes)
    byteCount += UInt64(bytes.count)
  }
  public mutating func update(_ bytes: some DataProtocol) {
    inner.update(data: bytes)
    byteCount += UInt64(bytes.count)
  }
  public func finalize() -> NixHash { NixHash(sha256: inner.finalize()) }
}
