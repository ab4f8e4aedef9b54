import Foundation
import NixFormats

/// Which URLs a substituter's narinfo may send this client to. The narinfo `URL:` is not covered
/// by the signature, so whoever answers (the cache, or anyone on a plain-http path) chooses it:
/// unchecked, a root daemon would read local files (`file:///etc/passwd`), request other hosts
/// and talk to any TCP port through libcurl's other protocols (`gopher://`, `dict://`).
///
/// The rules (Documentation/configuration.md, "NAR URLs"):
/// - A relative URL (what Nix writes: `nar/<hash>.nar.zst`) is taken below the substituter's URL.
///   Its characters are letters, digits and `._~/+=,@-`; no `.` or `..` segment, no `%`, `?`, `#`.
/// - An absolute URL is accepted only from an http(s) substituter, only http or https, without
///   credentials, and only to the substituter's own host and port or to a host the operator named
///   (`--nar-url-host`). A `file://` substituter takes relative URLs only.
/// - At most `maxLength` bytes.
/// Every transfer is also held to its protocols in libcurl (`Transport`): http and https, or file.
struct URLPolicy: Sendable {
  static let maxLength = 4096
  /// Extra hosts (`host` or `host:port`, lower case) absolute NAR URLs may name.
  let extraHosts: Set<String>

  init(extraHosts: [String]) {
    self.extraHosts = Set(extraHosts.map { $0.lowercased() })
  }

  /// The URL to fetch for a narinfo's `URL:` field, or why not.
  func narURL(_ raw: String, substituter: String) throws(CacheError) -> String {
    func refuse(_ reason: String) -> CacheError { .refusedURL(url: raw, reason: reason) }
    guard raw.utf8.count <= Self.maxLength else {
      throw refuse("the URL is \(raw.utf8.count) bytes, more than \(Self.maxLength)")
    }
    if let bad = raw.unicodeScalars.first(where: { $0.value <= 0x20 || $0.value >= 0x7f }) {
      throw refuse("the URL contains the character U+\(String(bad.value, radix: 16, uppercase: true))")
    }
    let base = Origin(substituter)
    guard let scheme = Self.scheme(of: raw) else {
      return try relative(raw, below: substituter, refuse)
    }
    guard base?.isHTTP == true else {
      throw refuse("a \(base?.scheme ?? "file"):// substituter takes only relative NAR URLs")
    }
    guard scheme == "http" || scheme == "https" else {
      throw refuse("only http and https NAR URLs are followed, not \(scheme)")
    }
    guard let target = Origin(raw), target.hasHost else { throw refuse("not a valid URL") }
    guard !target.hasCredentials else { throw refuse("NAR URLs may not carry credentials") }
    if target.hostPort == base!.hostPort || extraHosts.contains(target.hostPort)
      || extraHosts.contains(target.host)
    {
      return raw
    }
    throw refuse(
      "host \(target.hostPort) is not the substituter's (\(base!.hostPort)); allow it with --nar-url-host \(target.host)")
  }

  private func relative(
    _ raw: String, below substituter: String, _ refuse: (String) -> CacheError
  ) throws(CacheError) -> String {
    let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~/+=,@-".unicodeScalars)
    if let bad = raw.unicodeScalars.first(where: { !allowed.contains($0) }) {
      throw refuse("a relative NAR URL may not contain '\(bad)'")
    }
    if raw.split(separator: "/").contains(where: { $0 == "." || $0 == ".." }) {
      throw refuse("a relative NAR URL may not contain '.' or '..' segments")
    }
    return "\(substituter)/\(raw)"
  }

  /// The lower-cased scheme of an absolute URL (`letter *(letter / digit / + - .) ":"`).
  static func scheme(of url: String) -> String? {
    guard let colon = url.firstIndex(of: ":") else { return nil }
    let s = url[..<colon]
    guard let first = s.unicodeScalars.first, CharacterSet.letters.contains(first),
      s.unicodeScalars.allSatisfy({ CharacterSet.alphanumerics.contains($0) || "+-.".unicodeScalars.contains($0) })
    else { return nil }
    return s.lowercased()
  }
}

/// Scheme, host and effective port of a URL.
struct Origin {
  let scheme: String
  let host: String
  let port: Int?
  let hasCredentials: Bool
  var hasHost: Bool { !host.isEmpty }
  var isHTTP: Bool { scheme == "http" || scheme == "https" }
  var effectivePort: Int { port ?? (scheme == "https" ? 443 : 80) }
  var hostPort: String { "\(host):\(effectivePort)" }

  init?(_ url: String) {
    guard let c = URLComponents(string: url), let scheme = c.scheme?.lowercased() else { return nil }
    self.scheme = scheme
    // URLComponents keeps IPv6 literals bracketed in `host` on some platforms and not others.
    var host = (c.percentEncodedHost ?? "").lowercased()
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    self.host = host
    self.port = c.port
    self.hasCredentials = c.user != nil || c.password != nil
  }
}

extension BinaryCacheClient {
  /// The URL a narinfo's `URL:` names below `substituter` (a base URL without a trailing slash), or
  /// why this client refuses it (`URLPolicy`).
  public static func narURL(_ raw: String, substituter: String, extraHosts: [String] = []) throws(CacheError) -> String {
    try URLPolicy(extraHosts: extraHosts).narURL(raw, substituter: substituter)
  }

  /// Checks a NAR file as a cache stores it (compressed as `info` says) exactly as a download is
  /// checked (FileSize, FileHash, the size bound, decompression, NarSize, NarHash, a strict NAR
  /// parse), handing the NAR to `sink`; for files that did not come over the network.
  public static func verifyNARFile(
    _ file: UnsafeRawBufferPointer, info: NarInfo, source: String, into sink: any NARSink
  ) throws(CacheError) {
    let state = try NARDownload(info: info, url: source, sink: sink)
    do {
      try state.start(ResponseHead(status: 200), requested: 0)
      try state.consume(file)
      try state.finish()
    } catch let e as CacheError {
      throw e
    } catch {
      throw .sink(url: source, error: error)
    }
  }
}
