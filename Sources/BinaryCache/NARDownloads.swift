import Foundation
import Logging
import NixFormats

// NAR downloads: streamed through the verification pipeline (NARDownload) into a sink.
extension BinaryCacheClient {
  /// Streams the NAR of `path` to `sink`, decompressed, from the substituter that served the
  /// narinfo. Returns only once FileSize/FileHash (when present) and NarSize/NarHash verified;
  /// when it throws, `sink` must discard what it got.
  public func fetchNAR(_ path: CachedPathInfo, into sink: any NARSink) async throws(CacheError) {
    try await fetchNAR(path.info, from: path.substituter, into: sink)
  }

  public func fetchNAR(
    _ info: NarInfo, from substituter: Substituter, into sink: any NARSink
  ) async throws(CacheError) {
    try await download(info, from: substituter, into: sink, sinkHasData: false)
  }

  /// Looks the path up and streams its NAR; a substituter that fails (not only one that misses)
  /// falls through to the next one that has the path, and the sink is reset in between.
  @discardableResult
  public func fetchNAR(for path: StorePath, into sink: any NARSink) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    var sinkHasData = false
    for entry in await resolveAll() {
      guard case .success(let substituter) = entry else { continue }
      asked.append(substituter.url)
      do {
        guard let found = try await narInfo(for: path, from: substituter) else { continue }
        try await download(found.info, from: substituter, into: sink, sinkHasData: sinkHasData)
        return found
      } catch {
        fellThrough(substituter, path: path, cause: FallThroughCause(error), error: error)
        failures.append(error)
        sinkHasData = true
      }
    }
    if failures.isEmpty { throw .notFound(storePath: path.path, substituters: asked) }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: path.path, failures: failures)
  }

  /// The whole NAR in memory, verified (tests, small paths).
  public func narBytes(_ path: CachedPathInfo) async throws(CacheError) -> [UInt8] {
    let buffer = NARBuffer()
    try await fetchNAR(path, into: buffer)
    return buffer.bytes
  }

  /// Where the NAR of `info` is fetched from, by the rules of `URLPolicy`.
  public func narURL(_ info: NarInfo, from substituter: Substituter) throws(CacheError) -> String {
    try urlPolicy.narURL(info.url, substituter: substituter.url)
  }

  private func download(
    _ info: NarInfo, from substituter: Substituter, into sink: any NARSink, sinkHasData: Bool
  ) async throws(CacheError) {
    let url: String
    do { url = try narURL(info, from: substituter) } catch {
      logger.error("NAR URL refused", metadata: ["path": "\(info.storePath)", "error": "\(error)"])
      throw error
    }
    let state = try NARDownload(info: info, url: url, sink: sink, sinkHasData: sinkHasData)
    // Only HTTP can resume; a file:// read that failed simply starts again.
    let resumable = url.hasPrefix("http://") || url.hasPrefix("https://")
    let started = Date()
    do {
      try await withRetries(url) { () async throws(CacheError) in
        let offset = resumable ? state.received : 0
        if offset > 0 {
          logger.info("resuming NAR download", metadata: ["url": "\(LogText.bounded(url))", "offset": "\(offset)"])
        }
        let head = try await transport.get(
          url, from: offset,
          onStart: { head in try state.start(head, requested: offset) },
          onData: { bytes in try state.consume(bytes) },
          onEnd: { try state.finish() })
        if !head.isSuccess { throw .httpStatus(url: url, status: head.status, attempts: 1) }
      }
    } catch {
      logger.error("NAR download failed", metadata: ["path": "\(info.storePath)", "error": "\(error)"])
      throw error
    }
    logger.debug(
      "NAR verified",
      metadata: [
        "path": "\(info.storePath)", "narSize": "\(info.narSize)", "compression": "\(info.compression)",
        "seconds": "\(Date().timeIntervalSince(started))", "resumes": "\(state.resumes)",
        "restarts": "\(state.restarts)",
      ])
  }
}
