import Foundation
import Logging
import NixFormats

// Small bodies with retries, and the retry policy every transfer uses.
extension BinaryCacheClient {
  /// GETs a small text file (narinfo, nix-cache-info), with retries. nil for a miss: 404, or 403
  /// as S3 answers for absent keys (Nix treats both as "not there").
  func fetchText(_ url: String, limit: Int = 8 << 20) async throws(CacheError) -> String? {
    try await fetchBytes(url, limit: limit).map { String(decoding: $0.bytes, as: UTF8.self) }
  }

  /// Runs `body` until it succeeds, fails for good, or runs out of attempts. Waits grow
  /// exponentially with ±50% jitter, so many clients retrying one cache do not synchronise.
  func withRetries<T>(_ url: String, _ body: () async throws(CacheError) -> T) async throws(CacheError) -> T {
    var attempt = 1
    while true {
      do {
        return try await body()
      } catch {
        guard error.isRetryable, attempt < configuration.maxAttempts, !Task.isCancelled else {
          throw error.withAttempts(attempt)
        }
        let delay = configuration.retryBaseDelay * Double(1 << min(attempt - 1, 10)) * Double.random(in: 0.5...1.5)
        logger.warning(
          "transfer failed; retrying",
          metadata: [
            "url": "\(LogText.bounded(url))", "attempt": "\(attempt)", "delay": "\(delay)", "error": "\(error)",
          ])
        do { try await Task.sleep(nanoseconds: UInt64(delay * 1e9)) } catch { throw .cancelled(url: url) }
        attempt += 1
      }
    }
  }
}
