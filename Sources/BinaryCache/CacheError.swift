import NixFormats

/// Everything the cache client can fail with. Each case carries what a person needs to act on it
/// (which store path, which URL, which hash or status) and prints as one line.
public enum CacheError: Error, Sendable, CustomStringConvertible {
  /// No configured substituter has the path (every one answered 404/403, or none are configured).
  case notFound(storePath: String, substituters: [String])
  /// A non-success HTTP status that is not a miss (after retries when it was retryable).
  case httpStatus(url: String, status: Int, attempts: Int)
  /// A transport failure reported by libcurl (after retries when it was retryable).
  case network(url: String, curlCode: Int, message: String, attempts: Int)
  /// No bytes arrived for `seconds` (the stall timeout).
  case stalled(url: String, seconds: Double, attempts: Int)
  case hashMismatch(url: String, field: String, expected: NixHash, actual: NixHash)
  case sizeMismatch(url: String, field: String, expected: UInt64, actual: UInt64)
  case decompression(url: String, compression: String, reason: String)
  case unsupportedCompression(url: String, compression: String)
  /// The decompressed stream is not a valid NAR.
  case invalidNAR(url: String, error: NARError)
  case malformedNarInfo(NarInfoError)
  /// A narinfo answered for another path than the one asked for.
  case wrongStorePath(url: String, expected: String, actual: String)
  case untrusted(url: String, error: SignatureError)
  case storeDirMismatch(substituter: String, expected: String, actual: String)
  case malformedCacheInfo(NarInfoError)
  /// The server answered a Range request with a range we did not ask for.
  case badRange(url: String, requestedOffset: UInt64, contentRange: String)
  /// The NAR sink refused the bytes; the download was abandoned.
  case sink(url: String, error: any Error)
  /// A URL a narinfo (or a redirect) named that this client will not open: another protocol, another
  /// host, a path escaping the cache, or too long. Never retried.
  case refusedURL(url: String, reason: String)
  case invalidConfiguration(String)
  case cancelled(url: String)
  /// Every substituter that might have had the path failed; one entry per substituter.
  case allSubstitutersFailed(storePath: String, failures: [CacheError])
  /// S3 refused the request for its credentials (a bad key or signature, an expired token).
  case s3Refused(url: String, code: String, message: String)

  public var description: String {
    switch self {
    case .notFound(let path, let subs):
      return subs.isEmpty
        ? "\(path): no substituters are configured (use --substituter or substituters in nix.conf)"
        : "\(path) is not in any substituter (asked \(subs.joined(separator: ", ")))"
    case .httpStatus(let url, let status, let attempts):
      return "\(Self.q(url)): HTTP \(status)\(Self.tries(attempts))"
    case .network(let url, let code, let message, let attempts):
      return "\(Self.q(url)): \(Self.q(message)) (curl error \(code))\(Self.tries(attempts))"
    case .stalled(let url, let seconds, let attempts):
      return "\(Self.q(url)): no data received for \(Self.seconds(seconds)) (stall timeout)\(Self.tries(attempts))"
    case .hashMismatch(let url, let field, let expected, let actual):
      return "\(Self.q(url)): \(field) mismatch: expected \(expected), got \(actual); the download was discarded"
    case .sizeMismatch(let url, let field, let expected, let actual):
      return "\(Self.q(url)): \(field) mismatch: expected \(expected) bytes, got \(actual); the download was discarded"
    case .decompression(let url, let compression, let reason):
      return "\(Self.q(url)): corrupt \(compression) stream: \(reason)"
    case .unsupportedCompression(let url, let compression):
      return "\(Self.q(url)): unsupported compression '\(Self.q(compression))' (supported: xz, zstd, bzip2, none)"
    case .invalidNAR(let url, let error):
      return "\(Self.q(url)): \(error)"
    case .malformedNarInfo(let error):
      return "\(error)"
    case .wrongStorePath(let url, let expected, let actual):
      return "\(Self.q(url)): narinfo is for \(actual), not \(expected)"
    case .untrusted(let url, let error):
      return "\(Self.q(url)): \(error) (add the key with --trusted-public-key, or --no-require-sigs for a private cache)"
    case .storeDirMismatch(let sub, let expected, let actual):
      return "\(Self.q(sub)): the cache is for store \(actual), but this node's store is \(expected); substituter disabled"
    case .malformedCacheInfo(let error):
      return "\(error)"
    case .badRange(let url, let offset, let range):
      return "\(Self.q(url)): asked for bytes from \(offset), server sent Content-Range '\(Self.q(range))'"
    case .sink(let url, let error):
      return "\(Self.q(url)): the NAR consumer failed: \(error)"
    case .refusedURL(let url, let reason):
      return "\(Self.q(url)): refused: \(reason)"
    case .invalidConfiguration(let why):
      return "invalid cache configuration: \(why)"
    case .cancelled(let url):
      return "\(Self.q(url)): cancelled"
    case .s3Refused(let url, let code, let message):
      return "\(Self.q(url)): S3 refused the credentials: \(Self.q(code)): \(Self.q(message)) (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile in the credentials file)"
    case .allSubstitutersFailed(let path, let failures):
      return "\(path): every substituter failed: " + failures.map(\.description).joined(separator: "; ")
    }
  }

  /// Errors worth another attempt: connection trouble, 5xx, 429, stalls. Never a miss, a bad hash
  /// or a bad signature: those would only fail again.
  var isRetryable: Bool {
    switch self {
    case .httpStatus(_, let status, _): return status == 429 || (500..<600).contains(status)
    case .network, .stalled: return true
    default: return false
    }
  }

  func withAttempts(_ n: Int) -> CacheError {
    switch self {
    case .httpStatus(let url, let status, _): return .httpStatus(url: url, status: status, attempts: n)
    case .network(let url, let code, let message, _):
      return .network(url: url, curlCode: code, message: message, attempts: n)
    case .stalled(let url, let seconds, _): return .stalled(url: url, seconds: seconds, attempts: n)
    default: return self
    }
  }

  /// A value from outside (a URL, a server's message) as it may appear in one line.
  static func q(_ text: String) -> String { LogText.bounded(text) }

  static func tries(_ n: Int) -> String { n > 1 ? " after \(n) attempts" : "" }
  static func seconds(_ s: Double) -> String {
    s == s.rounded() ? "\(Int(s)) s" : "\(s) s"
  }
}
