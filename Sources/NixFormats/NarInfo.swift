/// A `.narinfo` file: what a binary cache says about one store path.
public struct NarInfo: Hashable, Sendable {
  public enum Compression: Hashable, Sendable, CustomStringConvertible {
    case none, xz, zstd, bzip2, br
    case other(String)

    public init(_ text: String) {
      switch text {
      case "none", "": self = .none
      case "xz": self = .xz
      case "zstd": self = .zstd
      case "bzip2": self = .bzip2
      case "br": self = .br
      default: self = .other(text)
      }
    }

    public var description: String {
      switch self {
      case .none: "none"
      case .xz: "xz"
      case .zstd: "zstd"
      case .bzip2: "bzip2"
      case .br: "br"
      case .other(let s): s
      }
    }
  }

  public var storePath: StorePath
  public var url: String
  public var compression: Compression
  public var fileHash: NixHash?
  public var fileSize: UInt64?
  public var narHash: NixHash
  public var narSize: UInt64
  public var references: [StorePath]
  public var deriver: String?
  public var signatures: [NarSignature]
  public var ca: String?

  public init(
    storePath: StorePath, url: String, compression: Compression = .none, fileHash: NixHash? = nil,
    fileSize: UInt64? = nil, narHash: NixHash, narSize: UInt64, references: [StorePath] = [],
    deriver: String? = nil, signatures: [NarSignature] = [], ca: String? = nil
  ) {
    self.storePath = storePath
    self.url = url
    self.compression = compression
    self.fileHash = fileHash
    self.fileSize = fileSize
    self.narHash = narHash
    self.narSize = narSize
    self.references = references
    self.deriver = deriver
    self.signatures = signatures
    self.ca = ca
  }

  /// Parses narinfo text. `source` names where it came from (a URL) for error messages.
  public init(parsing text: String, source: String = "narinfo", storeDir: String = StorePath.defaultStoreDir)
    throws(NarInfoError)
  {
    func fail(_ line: Int, _ reason: String) -> NarInfoError {
      NarInfoError(source: source, line: line, reason: reason)
    }
    var fields: [String: (String, Int)] = [:]
    var sigs: [(String, Int)] = []
    let bytes = Array(text.utf8)
    guard bytes.last == UInt8(ascii: "\n") else {
      throw fail(bytes.filter { $0 == UInt8(ascii: "\n") }.count + 1, "truncated: the last line has no newline")
    }
    var lineNumber = 0
    for line in bytes.dropLast().split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
      lineNumber += 1
      guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon != line.startIndex else {
        throw fail(lineNumber, "expected 'Key: value', found '\(printable(line))'")
      }
      let key = String(decoding: line[line.startIndex..<colon], as: UTF8.self)
      var valueStart = colon + 1
      if valueStart < line.endIndex && line[valueStart] == UInt8(ascii: " ") { valueStart += 1 }
      let value = String(decoding: line[valueStart..<line.endIndex], as: UTF8.self)
      if key == "Sig" {
        sigs.append((value, lineNumber))
      } else if let first = fields[key] {
        throw fail(lineNumber, "duplicate field '\(key)' (first on line \(first.1))")
      } else {
        fields[key] = (value, lineNumber)
      }
    }
    func required(_ key: String) throws(NarInfoError) -> (String, Int) {
      guard let v = fields[key] else { throw fail(lineNumber, "missing required field '\(key)'") }
      return v
    }
    func hash(_ key: String) throws(NarInfoError) -> NixHash? {
      guard let (v, line) = fields[key] else { return nil }
      do { return try NixHash(parsing: v) } catch { throw fail(line, "\(key): \(error)") }
    }
    func number(_ key: String) throws(NarInfoError) -> UInt64? {
      guard let (v, line) = fields[key] else { return nil }
      guard let n = UInt64(v) else { throw fail(line, "\(key): '\(v)' is not a number") }
      return n
    }

    let (pathText, pathLine) = try required("StorePath")
    do { storePath = try StorePath(pathText, storeDir: storeDir) } catch { throw fail(pathLine, "\(error)") }
    (url, _) = try required("URL")
    if url.isEmpty { throw fail(fields["URL"]!.1, "empty URL") }
    compression = fields["Compression"].map { Compression($0.0) } ?? .bzip2
    fileHash = try hash("FileHash")
    fileSize = try number("FileSize")
    _ = try required("NarHash")
    narHash = try hash("NarHash")!
    guard narHash.algorithm == .sha256 else { throw fail(fields["NarHash"]!.1, "NarHash must be sha256") }
    _ = try required("NarSize")
    narSize = try number("NarSize")!
    if narSize == 0 { throw fail(fields["NarSize"]!.1, "NarSize must be positive") }
    var refs: [StorePath] = []
    if let (v, line) = fields["References"] {
      for base in v.split(separator: " ") {
        do { refs.append(try StorePath(baseName: String(base), storeDir: storeDir)) } catch {
          throw fail(line, "References: \(error)")
        }
      }
    }
    references = refs
    deriver = fields["Deriver"].map(\.0)
    var parsedSigs: [NarSignature] = []
    for (v, line) in sigs {
      do { parsedSigs.append(try NarSignature(parsing: v)) } catch { throw fail(line, "Sig: \(error)") }
    }
    signatures = parsedSigs
    ca = fields["CA"].map(\.0)
  }

  /// The text Nix writes, in Nix's field order.
  public var serialized: String {
    var s = "StorePath: \(storePath.path)\nURL: \(url)\nCompression: \(compression)\n"
    if let h = fileHash { s += "FileHash: \(h.nix32)\n" }
    if let n = fileSize { s += "FileSize: \(n)\n" }
    s += "NarHash: \(narHash.nix32)\nNarSize: \(narSize)\n"
    s += "References: \(references.map(\.baseName).joined(separator: " "))\n"
    if let d = deriver { s += "Deriver: \(d)\n" }
    for sig in signatures { s += "Sig: \(sig)\n" }
    if let ca { s += "CA: \(ca)\n" }
    return s
  }

  /// What is signed: `1;<path>;<narHash>;<narSize>;<sorted, comma-joined reference paths>`.
  public var fingerprint: String {
    "1;\(storePath.path);\(narHash.nix32);\(narSize);\(references.map(\.path).sorted().joined(separator: ","))"
  }

  public mutating func sign(with key: SecretKey) {
    signatures.removeAll { $0.keyName == key.name }
    signatures.append(key.sign(fingerprint))
  }

  /// Succeeds with the name of a trusted key whose signature is valid; otherwise says who signed.
  @discardableResult
  public func verify(trusting trusted: TrustedKeys) throws(SignatureError) -> String {
    if let signer = trusted.validSigner(of: fingerprint, signatures: signatures) { return signer }
    throw SignatureError(
      storePath: storePath.path, signers: signatures.map(\.keyName),
      trusted: trusted.keys.map(\.name))
  }
}

public struct NarInfoError: Error, Hashable, Sendable, CustomStringConvertible {
  public let source: String
  public let line: Int
  public let reason: String
  public var description: String {
    "malformed narinfo \(LogText.bounded(source)) line \(line): \(LogText.bounded(reason, limit: 512))"
  }
}

public struct SignatureError: Error, Hashable, Sendable, CustomStringConvertible {
  public let storePath: String
  /// Key names of the signatures present (valid or not).
  public let signers: [String]
  public let trusted: [String]

  public var description: String {
    let by = signers.isEmpty ? "it has no signatures" : "signed by \(signers.joined(separator: ", "))"
    let keys = trusted.isEmpty ? "no keys are trusted" : "trusted keys: \(trusted.joined(separator: ", "))"
    return "\(storePath) has no valid signature by a trusted key (\(by); \(keys))"
  }
}

/// `nix-cache-info` at a cache's root.
public struct NixCacheInfo: Hashable, Sendable {
  public var storeDir: String
  public var wantMassQuery: Bool
  public var priority: Int
  /// `NixfsChunkIndex`: the chunk index a nixfs serve offers (`nixfs/v1`), absent elsewhere.
  public var chunkIndex: String?
  /// `NixfsBuild`: a nixfs serve that builds what nodes ask for (`nixfs/v1`), absent elsewhere.
  public var builds: String?

  public init(
    storeDir: String = StorePath.defaultStoreDir, wantMassQuery: Bool = false, priority: Int = 50, chunkIndex: String? = nil
  ) {
    self.storeDir = storeDir
    self.wantMassQuery = wantMassQuery
    self.priority = priority
    self.chunkIndex = chunkIndex
  }

  public init(parsing text: String, source: String = "nix-cache-info") throws(NarInfoError) {
    self.init()
    var sawStoreDir = false
    for (i, line) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
      guard let colon = line.firstIndex(of: ":") else {
        throw NarInfoError(source: source, line: i + 1, reason: "expected 'Key: value'")
      }
      let key = line[..<colon]
      let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
      switch key {
      case "StoreDir":
        storeDir = value
        sawStoreDir = true
      case "WantMassQuery": wantMassQuery = value == "1"
      case "Priority":
        guard let p = Int(value) else {
          throw NarInfoError(source: source, line: i + 1, reason: "Priority '\(value)' is not a number")
        }
        priority = p
      case NixfsWire.cacheInfoKey: chunkIndex = value
      case NixfsWire.buildInfoKey: builds = value
      default: continue
      }
    }
    if !sawStoreDir { throw NarInfoError(source: source, line: 0, reason: "missing StoreDir") }
  }

  public var serialized: String {
    "StoreDir: \(storeDir)\nWantMassQuery: \(wantMassQuery ? 1 : 0)\nPriority: \(priority)\n"
      + (chunkIndex.map { "\(NixfsWire.cacheInfoKey): \($0)\n" } ?? "")
      + (builds.map { "\(NixfsWire.buildInfoKey): \($0)\n" } ?? "")
  }
}
