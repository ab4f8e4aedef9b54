import BinaryCache
import ChunkStore
import Foundation
import Logging
import NixFormats

/// Why a path could not be materialised, as the filesystem reports it to the kernel.
public enum MaterialiseFailure: Error, Sendable, CustomStringConvertible {
  /// No cache has it (ENOENT; cached negatively).
  case notFound(String)
  /// Anything else: untrusted, hash mismatch, unreachable, stalled (EIO; not cached).
  case failed(String)

  public var description: String {
    switch self {
    case .notFound(let s), .failed(let s): s
    }
  }
}

/// Fetches, verifies and ingests a store path into the local store.
public protocol Materialiser: Sendable {
  /// Returns once the path is complete in the local store; throws `MaterialiseFailure`.
  func materialise(_ path: StorePath) async throws
}

/// The real materialiser: narinfo (signature checked) from the caches, NAR streamed through the
/// decompressor into a chunk-store ingest, committed only once its NarHash verified.
public final class Substitution: Materialiser, Sendable {
  public let cache: BinaryCacheClient
  public let store: ChunkStore
  let logger: Logger

  public init(cache: BinaryCacheClient, store: ChunkStore, logger: Logger) {
    self.cache = cache
    self.store = store
    self.logger = logger
  }

  public func materialise(_ path: StorePath) async throws {
    if store.isComplete(path) { return }
    let info: CachedPathInfo
    do {
      info = try await cache.narInfo(for: path)
    } catch {
      if case .notFound = error { throw MaterialiseFailure.notFound("\(error)") }
      throw MaterialiseFailure.failed("\(error)")
    }
    let ingest: Ingest
    do {
      ingest = try store.ingest(info.info)
    } catch {
      throw MaterialiseFailure.failed("\(error)")
    }
    do {
      try await cache.fetchNAR(info, into: ingest)
      _ = try ingest.commit()
      FSMetrics.narBytesFetched.increment(by: Int64(info.info.narSize))
      FSMetrics.downloadBytes.increment(by: Int64(info.info.fileSize ?? info.info.narSize))
    } catch {
      ingest.abort()
      throw MaterialiseFailure.failed("\(error)")
    }
  }

  /// Materialises the closures of `roots` eagerly (`nixfs fetch`), `parallel` paths at a time.
  public func fetchClosure(of roots: [StorePath], parallel: Int = 4) async throws -> (paths: Int, fetched: Int, narBytes: UInt64) {
    let closure = try await cache.closure(of: roots)
    let missing = closure.keys.filter { !store.isComplete($0) }.sorted()
    try await inParallel(missing, limit: parallel) { p in try await self.materialise(p) }
    let fetched = missing.count
    let bytes = missing.reduce(UInt64(0)) { $0 + (closure[$1]?.info.narSize ?? 0) }
    return (closure.count, fetched, bytes)
  }
}

/// Runs `body` for every item, at most `limit` at a time; the first error cancels the rest.
func inParallel<T: Sendable>(
  _ items: [T], limit: Int, _ body: @escaping @Sendable (T) async throws -> Void
) async throws {
  var queue = items[...]
  try await withThrowingTaskGroup(of: Void.self) { group in
    for _ in 0..<max(1, limit) {
      guard let item = queue.popFirst() else { break }
      group.addTask { try await body(item) }
    }
    while try await group.next() != nil {
      if let item = queue.popFirst() { group.addTask { try await body(item) } }
    }
  }
}
