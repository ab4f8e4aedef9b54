import Foundation
import NixFormats

/// How the client talks to binary caches. Defaults follow Nix where Nix has the same setting.
public struct CacheConfiguration: Sendable {
  /// Substituter URLs in configuration order (`http://`, `https://`, `file://`). A `?priority=N`
  /// query overrides the cache's own `Priority`, as in Nix.
  public var substituters: [String] = []
  /// `name:base64` public keys.
  public var trustedPublicKeys: [String] = []
  public var requireSignatures = true
  public var netrcFile: String? = nil
  /// Seconds to establish a connection.
  public var connectTimeout: Double = 10
  /// A transfer is abandoned (and retried) when fewer than `lowSpeedLimit × stallTimeout` bytes
  /// arrived in the last `stallTimeout` seconds (Nix's `stalled-download-timeout`): silence and a
  /// trickle both end it. There is deliberately no total timeout: a big NAR on a slow but moving
  /// link must still finish, and what it may send is bounded (`NARDownload.compressedLimit`).
  public var stallTimeout: Double = 30
  /// Bytes per second below which a transfer counts as stalled (see `stallTimeout`).
  public var lowSpeedLimit: Double = 1024
  /// Hosts (`host` or `host:port`) besides each substituter's own that absolute NAR URLs in its
  /// narinfos may point at. Empty: a narinfo can send the client only below its substituter.
  public var narURLHosts: [String] = []
  public var narinfoCachePositiveTTL: Double = 30 * 24 * 3600
  public var narinfoCacheNegativeTTL: Double = 3600
  /// Where the narinfo cache database lives; nil keeps lookups in memory only.
  public var stateDirectory: String? = nil
  /// Parallel transfers (and so kept-alive connections). Nix's `http-connections`.
  public var maxConnections = 32
  /// Attempts per transfer, first included (Nix's `download-attempts`).
  public var maxAttempts = 5
  /// First retry delay; doubled on each retry, with ±50% jitter.
  public var retryBaseDelay: Double = 0.25
  public var storeDir = StorePath.defaultStoreDir
  /// A CA bundle; nil uses libcurl's system store (or `NIX_SSL_CERT_FILE` / `SSL_CERT_FILE`).
  public var caFile: String? = nil

  public init() {}

  public func trustedKeys() throws(CacheError) -> TrustedKeys {
    do { return try TrustedKeys(parsing: trustedPublicKeys) } catch {
      throw .invalidConfiguration("trusted public key: \(error)")
    }
  }

  /// Applies the cache keys of a parsed nix.conf. Unknown keys are ignored: a nix.conf has many.
  public mutating func apply(nixConf settings: [String: String]) throws(CacheError) {
    func words(_ v: String) -> [String] { v.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init) }
    func number(_ key: String) throws(CacheError) -> Double? {
      guard let v = settings[key] else { return nil }
      guard let n = Double(v), n >= 0 else { throw .invalidConfiguration("nix.conf \(key) = '\(v)' is not a number") }
      return n
    }
    func bool(_ key: String) throws(CacheError) -> Bool? {
      guard let v = settings[key] else { return nil }
      switch v {
      case "true", "1", "yes": return true
      case "false", "0", "no": return false
      default: throw .invalidConfiguration("nix.conf \(key) = '\(v)' is not true or false")
      }
    }
    if let v = settings["substituters"] { substituters = words(v) }
    if let v = settings["extra-substituters"] { substituters += words(v) }
    if let v = settings["trusted-public-keys"] { trustedPublicKeys = words(v) }
    if let v = settings["extra-trusted-public-keys"] { trustedPublicKeys += words(v) }
    if let v = try bool("require-sigs") { requireSignatures = v }
    if let v = settings["netrc-file"], !v.isEmpty { netrcFile = v }
    // Nix's connect-timeout 0 means "libcurl's default": keep ours.
    if let v = try number("connect-timeout"), v > 0 { connectTimeout = v }
    if let v = try number("stalled-download-timeout"), v > 0 { stallTimeout = v }
    if let v = try number("narinfo-cache-positive-ttl") { narinfoCachePositiveTTL = v }
    if let v = try number("narinfo-cache-negative-ttl") { narinfoCacheNegativeTTL = v }
    if let v = try number("http-connections"), v >= 1 { maxConnections = Int(v) }
    if let v = try number("download-attempts"), v >= 1 { maxAttempts = Int(v) }
    if let v = settings["store"], v.hasPrefix("/") { storeDir = v }
    if let v = settings["ssl-cert-file"], !v.isEmpty { caFile = v }
  }
}

/// nix.conf syntax: `key = value` lines, `#` comments, `include FILE` / `!include FILE`
/// (the latter ignoring a missing file). Later lines win; `extra-KEY` values accumulate.
public enum NixConf {
  public struct ParseError: Error, Sendable, CustomStringConvertible {
    public let source: String
    public let line: Int
    public let reason: String
    public var description: String { "\(source) line \(line): \(reason)" }
  }

  /// Parses `text`. `include` is resolved through `load` (given the path as written, relative
  /// paths already resolved against `source`'s directory); it returns nil for a missing file.
  public static func parse(
    _ text: String, source: String = "nix.conf", load: (String) -> String? = { _ in nil }
  ) throws(ParseError) -> [String: String] {
    var settings: [String: String] = [:]
    try parse(text, source: source, load: load, depth: 0, into: &settings)
    return settings
  }

  /// Reads a nix.conf file from disk, following includes.
  public static func load(file: String) throws -> [String: String] {
    let text = try String(contentsOfFile: file, encoding: .utf8)
    return try parse(text, source: file) { try? String(contentsOfFile: $0, encoding: .utf8) }
  }

  static func parse(
    _ text: String, source: String, load: (String) -> String?, depth: Int, into settings: inout [String: String]
  ) throws(ParseError) {
    guard depth < 16 else { throw ParseError(source: source, line: 0, reason: "includes nested too deeply") }
    for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
      var line = Substring(raw)
      if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
      let trimmed = line.trimmingCharacters(in: .whitespaces)
      if trimmed.isEmpty { continue }
      let words = trimmed.split(whereSeparator: { $0 == " " || $0 == "\t" })
      if words.first == "include" || words.first == "!include" {
        guard words.count == 2 else {
          throw ParseError(source: source, line: i + 1, reason: "expected '\(words[0]) FILE'")
        }
        var path = String(words[1])
        if !path.hasPrefix("/") { path = ((source as NSString).deletingLastPathComponent as NSString).appendingPathComponent(path) }
        if let included = load(path) {
          try parse(included, source: path, load: load, depth: depth + 1, into: &settings)
        } else if words[0] == "include" {
          throw ParseError(source: source, line: i + 1, reason: "cannot read included file \(path)")
        }
        continue
      }
      guard let eq = trimmed.firstIndex(of: "=") else {
        throw ParseError(source: source, line: i + 1, reason: "expected 'key = value', found '\(trimmed)'")
      }
      let key = trimmed[..<eq].trimmingCharacters(in: .whitespaces)
      let value = trimmed[trimmed.index(after: eq)...].trimmingCharacters(in: .whitespaces)
      if key.isEmpty { throw ParseError(source: source, line: i + 1, reason: "empty key") }
      if key.hasPrefix("extra-"), let previous = settings[key], !previous.isEmpty {
        settings[key] = previous + " " + value
      } else {
        settings[key] = value
      }
    }
  }
}
