import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization

/// Why a path could not be materialised, as the filesystem reports it to the kernel. The cause
/// stays typed (a `CacheError`, an `IngestFailure`, ...) until the log line that shows it.
public enum MaterialiseFailure: Error, Sendable, CustomStringConvertible {
  /// No cache has it (ENOENT; remembered for a while). The cause says which caches were asked.
  case notFound(StorePath, cause: any Error)
  /// Anything else: untrusted, hash mismatch, unreachable, stalled, the store (EIO; not remembered).
  case failed(StorePath, cause: any Error)
  /// A read's chunks were still absent after they were fetched (a source that does not deliver).
  case chunksStillAbsent(StorePath)

  public var description: String {
    switch self {
    case .notFound(_, let cause): return "\(cause)"
    case .failed(let path, let cause):
      // Name the path once: most causes already do.
      let text = "\(cause)"
      return text.contains(path.path) ? text : "\(path): \(text)"
    case .chunksStillAbsent(let path): return "\(path): its chunks are still absent after fetching them"
    }
  }
}

/// Fetches, verifies and ingests store paths into the local store.
public protocol Materialiser: Sendable {
  /// Returns once the path can be served: complete, or partial (its tree from a verified chunk
  /// index, chunks fetched as read). With `whole`, only once it is complete. Throws
  /// `MaterialiseFailure`. Returns the tree it just registered (the filesystem keeps it rather
  /// than read it back from the index), or nil when the path was already there.
  @discardableResult
  func materialise(_ path: StorePath, whole: Bool) async throws -> Manifest?
  /// Fetches chunks partial paths lack into the store, each checked against its digest. When
  /// they are chunks of `path` and cannot be had from the chunk sources, `path` is completed
  /// from a whole, verified NAR instead.
  func fetchChunks(_ refs: [ChunkRef], for path: StorePath?) async throws
  /// Makes the path servable from its chunk index if its substituter offers a good one, with no
  /// NAR download; false when it cannot (the path is then fetched whole when first looked up).
  func materialiseFromIndex(_ path: StorePath) async -> Bool
  /// The chunks pods of `root` read first, as the chunk source learned them (empty: none).
  func startupProfile(of root: StorePath) async -> [ChunkRef]
  /// Tells the chunk source what a pod of `root` read first.
  func reportStartupProfile(_ refs: [ChunkRef], of root: StorePath) async
}


/// Runs `body` for every item, at most `limit` at a time; the first error cancels the rest.
package func inParallel<T: Sendable>(
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
