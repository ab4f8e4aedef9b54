import Crypto

/// `/nix/store/<32 nix32 chars>-<name>`, validated strictly.
public struct StorePath: Hashable, Comparable, Sendable, CustomStringConvertible {
  public static let defaultStoreDir = "/nix/store"
  public static let hashPartLength = 32
  public static let maxNameLength = 211

  public let storeDir: String
  /// The 32 Nix32 characters before the first dash.
  public let hashPart: String
  public let name: String

  /// `<hash>-<name>`, the directory entry in the store.
  public var baseName: String { "\(hashPart)-\(name)" }
  public var path: String { "\(storeDir)/\(baseName)" }
  public var description: String { path }

  /// Parses a full path. Anything that is not exactly `<storeDir>/<hash>-<name>` is rejected:
  /// other store dirs, `..`, duplicate or trailing slashes, sub-paths.
  public init(_ path: String, storeDir: String = StorePath.defaultStoreDir) throws(StorePathError) {
    let prefix = storeDir + "/"
    guard path.hasPrefix(prefix) else {
      throw StorePathError(path: path, reason: "not in the store directory \(storeDir)")
    }
    try self.init(baseName: String(path.dropFirst(prefix.count)), storeDir: storeDir, fullPath: path)
  }

  /// Parses a full path in whatever store directory it names (all before its last slash): for
  /// paths this program wrote itself, such as the index's.
  public init(parsingFull path: String) throws(StorePathError) {
    guard path.hasPrefix("/"), let slash = path.lastIndex(of: "/"), slash != path.startIndex else {
      throw StorePathError(path: path, reason: "expected an absolute path <store dir>/<hash>-<name>")
    }
    try self.init(path, storeDir: String(path[..<slash]))
  }

  /// Parses `<hash>-<name>`.
  public init(baseName: String, storeDir: String = StorePath.defaultStoreDir) throws(StorePathError) {
    try self.init(baseName: baseName, storeDir: storeDir, fullPath: baseName)
  }

  private init(baseName: String, storeDir: String, fullPath: String) throws(StorePathError) {
    let bytes = Array(baseName.utf8)
    guard bytes.count > Self.hashPartLength + 1, bytes[Self.hashPartLength] == UInt8(ascii: "-") else {
      throw StorePathError(path: fullPath, reason: "expected <32-character hash>-<name>")
    }
    let hash = String(decoding: bytes[..<Self.hashPartLength], as: UTF8.self)
    guard Nix32.isValid(hash) else {
      throw StorePathError(path: fullPath, reason: "hash part '\(hash)' is not Nix32")
    }
    let name = String(decoding: bytes[(Self.hashPartLength + 1)...], as: UTF8.self)
    if let reason = Self.nameProblem(name) {
      throw StorePathError(path: fullPath, reason: reason)
    }
    self.storeDir = storeDir
    self.hashPart = hash
    self.name = name
  }

  /// Why `name` is not a valid store path name, or nil when it is.
  public static func nameProblem(_ name: String) -> String? {
    let u = Array(name.utf8)
    if u.isEmpty { return "empty name" }
    if u.count > maxNameLength { return "name longer than \(maxNameLength) characters" }
    if u[0] == UInt8(ascii: ".") { return "name starts with a period" }
    for c in u {
      switch c {
      case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
        UInt8(ascii: "0")...UInt8(ascii: "9"):
        continue
      case UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
        UInt8(ascii: "?"), UInt8(ascii: "="):
        continue
      default:
        return "character '\(Unicode.Scalar(c).escaped(asASCII: true))' not allowed in a name"
      }
    }
    return nil
  }

  /// Nix's `makeStorePath`: the hash part is sha256 of `<type>:sha256:<hex>:<storeDir>:<name>`,
  /// folded to 20 bytes.
  public static func make(
    type: String, hash: NixHash, name: String, storeDir: String = StorePath.defaultStoreDir
  ) throws(StorePathError) -> StorePath {
    if let reason = nameProblem(name) { throw StorePathError(path: name, reason: reason) }
    let fingerprint = "\(type):\(hash.algorithm.rawValue):\(hash.hex):\(storeDir):\(name)"
    let digest = Array(SHA256.hash(data: Array(fingerprint.utf8)))
    var folded = [UInt8](repeating: 0, count: 20)
    for (i, b) in digest.enumerated() { folded[i % 20] ^= b }
    return try StorePath(baseName: "\(Nix32.encode(folded))-\(name)", storeDir: storeDir)
  }

  /// The path `nix-store --add` gives a tree with this NAR hash and no references.
  public static func addedSource(
    narHash: NixHash, name: String, storeDir: String = StorePath.defaultStoreDir
  ) throws(StorePathError) -> StorePath {
    try make(type: "source", hash: narHash, name: name, storeDir: storeDir)
  }

  public static func < (a: StorePath, b: StorePath) -> Bool { a.path < b.path }
}

public struct StorePathError: Error, Hashable, Sendable, CustomStringConvertible {
  public let path: String
  public let reason: String
  public var description: String { "invalid store path '\(path)': \(reason)" }
}
