// `s3://` substituters as Nix spells them. Requests go over plain HTTP(S) to the bucket, signed
// with AWS Signature Version 4 by libcurl (CURLOPT_AWS_SIGV4); credentials come from where the
// AWS SDK that Nix uses looks for them.
import Foundation

/// An `s3://BUCKET?region=...&endpoint=...&profile=...&scheme=...` URL.
struct S3Location: Sendable, Equatable {
  let bucket: String
  let region: String
  let profile: String?
  /// The bucket's HTTP(S) base URL, no trailing slash: path-style under a custom `endpoint`
  /// (as Nix, MinIO and Ceph do), virtual-hosted on AWS itself.
  let baseURL: String

  init(parsing url: String) throws(CacheError) {
    func refuse(_ why: String) -> CacheError { .invalidConfiguration("substituter '\(url)': \(why)") }
    guard url.hasPrefix("s3://") else { throw refuse("not an s3:// URL") }
    var rest = Substring(url.dropFirst(5))
    var params: [String: String] = [:]
    if let q = rest.firstIndex(of: "?") {
      for pair in rest[rest.index(after: q)...].split(separator: "&") {
        let kv = pair.split(separator: "=", maxSplits: 1)
        let value = kv.count == 2 ? String(kv[1]).removingPercentEncoding ?? String(kv[1]) : ""
        params[String(kv[0])] = value
      }
      rest = rest[..<q]
    }
    while rest.hasSuffix("/") { rest.removeLast() }
    let bucket = String(rest)
    // S3's bucket naming rules: 3-63 characters of lower-case letters, digits, '.' and '-'.
    guard (3...63).contains(bucket.count),
      bucket.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "." || $0 == "-") })
    else { throw refuse("'\(bucket)' is not an S3 bucket name") }
    let region = params["region"].flatMap { $0.isEmpty ? nil : $0 } ?? "us-east-1"
    guard region.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }) else {
      throw refuse("region '\(region)' is not an AWS region name")
    }
    let scheme = params["scheme"].flatMap { $0.isEmpty ? nil : $0 } ?? "https"
    guard scheme == "https" || scheme == "http" else { throw refuse("scheme '\(scheme)': expected https or http") }
    if let endpoint = params["endpoint"], !endpoint.isEmpty {
      var base = endpoint.contains("://") ? endpoint : "\(scheme)://\(endpoint)"
      while base.hasSuffix("/") { base.removeLast() }
      guard base.hasPrefix("http://") || base.hasPrefix("https://") else {
        throw refuse("endpoint '\(endpoint)': expected HOST[:PORT] or an http(s) URL")
      }
      baseURL = "\(base)/\(bucket)"
    } else if bucket.contains(".") {
      // A dotted name does not match the wildcard certificate of the virtual-hosted form.
      baseURL = "\(scheme)://s3.\(region).amazonaws.com/\(bucket)"
    } else {
      baseURL = "\(scheme)://\(bucket).s3.\(region).amazonaws.com"
    }
    self.bucket = bucket
    self.region = region
    self.profile = params["profile"].flatMap { $0.isEmpty ? nil : $0 }
  }
}

/// An AWS access key, and the session token of temporary credentials.
struct S3Credentials: Sendable, Equatable {
  let accessKeyID: String
  let secretAccessKey: String
  let sessionToken: String?

  /// In the AWS SDK's order: a `profile=` in the URL reads that profile of the shared credentials
  /// file; otherwise `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), then
  /// the profile `AWS_PROFILE` names (or `default`). The file is `AWS_SHARED_CREDENTIALS_FILE`,
  /// else `~/.aws/credentials`. Nil when there are none: the requests go unsigned (a public bucket).
  static func find(profile: String?, environment: [String: String]) throws(CacheError) -> S3Credentials? {
    if profile == nil, let id = environment["AWS_ACCESS_KEY_ID"], !id.isEmpty,
      let secret = environment["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty
    {
      return S3Credentials(
        accessKeyID: id, secretAccessKey: secret, sessionToken: environment["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 })
    }
    let name = profile ?? environment["AWS_PROFILE"].flatMap { $0.isEmpty ? nil : $0 } ?? "default"
    let file =
      environment["AWS_SHARED_CREDENTIALS_FILE"]
      ?? (environment["HOME"] ?? NSHomeDirectory()) + "/.aws/credentials"
    guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
      if profile != nil {
        throw .invalidConfiguration("S3 profile '\(name)': cannot read the credentials file \(file)")
      }
      return nil
    }
    let section = parseINI(text)[name] ?? [:]
    guard let id = section["aws_access_key_id"], let secret = section["aws_secret_access_key"] else {
      if profile != nil {
        throw .invalidConfiguration("S3 profile '\(name)': \(file) has no aws_access_key_id and aws_secret_access_key for it")
      }
      return nil
    }
    return S3Credentials(accessKeyID: id, secretAccessKey: secret, sessionToken: section["aws_session_token"])
  }

  /// The sections of an AWS credentials file: `[name]` headers, `key = value` lines, `#`/`;` comments.
  static func parseINI(_ text: String) -> [String: [String: String]] {
    var out: [String: [String: String]] = [:]
    var current: String? = nil
    for raw in text.split(whereSeparator: \.isNewline) {
      let line = raw.trimmingCharacters(in: .whitespaces)
      if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
      if line.hasPrefix("[") && line.hasSuffix("]") {
        current = line.dropFirst().dropLast().trimmingCharacters(in: .whitespaces)
        continue
      }
      guard let current, let eq = line.firstIndex(of: "=") else { continue }
      let key = line[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
      out[current, default: [:]][key] = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
    }
    return out
  }
}

/// Which requests are signed, and how: every URL below the bucket's base.
struct S3Signer: Sendable {
  let prefix: String
  let region: String
  let credentials: S3Credentials

  func signs(_ url: String) -> Bool { url.hasPrefix(prefix) }
}

/// The `<Code>` and `<Message>` of an S3 error response.
struct S3Refusal: Sendable {
  let code: String
  let message: String

  init?(_ body: [UInt8]) {
    let text = String(decoding: body, as: UTF8.self)
    func element(_ name: String) -> String? {
      guard let start = text.range(of: "<\(name)>"), let end = text.range(of: "</\(name)>", range: start.upperBound..<text.endIndex)
      else { return nil }
      return String(text[start.upperBound..<end.lowerBound])
    }
    guard let code = element("Code") else { return nil }
    self.code = code
    self.message = element("Message") ?? ""
  }

  /// Refusals that are about who asks, not what: a missing key is `AccessDenied` or `NoSuchKey`
  /// (a miss, as Nix treats it); these are not, and retrying will not help.
  var isAboutCredentials: Bool {
    ["SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed"]
      .contains(code)
  }
}
