/// One step of a NAR, in archive order. Names are raw bytes: NARs may hold any byte but `/` and NUL.
/// The root node has an empty name; every other node's name is non-empty.
public enum NAREvent {
  case directory(name: [UInt8])
  case endDirectory
  /// A regular file's header. `contentOffset` is the offset of its first content byte in the NAR
  /// (the `narOffset` of `.ls` listings). Its content follows as `.data` pieces, then `.endFile`.
  case file(name: [UInt8], size: UInt64, executable: Bool, contentOffset: UInt64)
  /// A piece of the current file's content. Valid only during the callback.
  case data(UnsafeRawBufferPointer)
  case endFile
  case symlink(name: [UInt8], target: [UInt8])
}

/// Why a NAR was rejected, where (byte offset), and at which path inside the archive.
public struct NARError: Error, Hashable, Sendable, CustomStringConvertible {
  public enum Kind: Hashable, Sendable {
    case badMagic
    case unexpectedToken(expected: String, found: String)
    case nonEmptyExecutableValue
    case invalidName(String)
    case entriesNotSorted(previous: String, name: String)
    case invalidSymlinkTarget(String)
    case nonZeroPadding
    case stringTooLong(length: UInt64, limit: UInt64)
    case lengthPastEnd(length: UInt64)
    case tooDeep(limit: Int)
    case trailingBytes
    case truncated
    case writerMisuse(String)
  }

  public let kind: Kind
  public let offset: UInt64
  /// Path inside the archive, `/` for the root.
  public let path: String

  public var description: String {
    let what: String
    switch kind {
    case .badMagic: what = "not a NAR (bad magic)"
    case .unexpectedToken(let expected, let found): what = "expected \(expected), found \(found)"
    case .nonEmptyExecutableValue: what = "non-empty value after 'executable'"
    case .invalidName(let why): what = "invalid entry name: \(why)"
    case .entriesNotSorted(let previous, let name):
      what = "entry '\(name)' does not sort strictly after '\(previous)'"
    case .invalidSymlinkTarget(let why): what = "invalid symlink target: \(why)"
    case .nonZeroPadding: what = "non-zero padding byte"
    case .stringTooLong(let length, let limit): what = "string of \(length) bytes exceeds the limit of \(limit)"
    case .lengthPastEnd(let length): what = "length \(length) runs past the end of the archive"
    case .tooDeep(let limit): what = "nesting deeper than \(limit) levels"
    case .trailingBytes: what = "bytes after the end of the archive"
    case .truncated: what = "archive ends early"
    case .writerMisuse(let why): what = "invalid event sequence: \(why)"
    }
    return "NAR error at byte \(offset) (\(path)): \(what)"
  }
}

enum NARToken {
  static let magic = Array("nix-archive-1".utf8)
  static let open = Array("(".utf8)
  static let close = Array(")".utf8)
  static let type = Array("type".utf8)
  static let regular = Array("regular".utf8)
  static let symlink = Array("symlink".utf8)
  static let directory = Array("directory".utf8)
  static let executable = Array("executable".utf8)
  static let contents = Array("contents".utf8)
  static let target = Array("target".utf8)
  static let entry = Array("entry".utf8)
  static let name = Array("name".utf8)
  static let node = Array("node".utf8)
}

extension UnsafeRawBufferPointer {
  @inline(__always)
  func equals(_ token: [UInt8]) -> Bool {
    guard count == token.count else { return false }
    return token.withUnsafeBytes { memcmp($0.baseAddress!, baseAddress!, count) == 0 }
  }
}

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif
