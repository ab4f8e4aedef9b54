import Foundation
import NixFormats
import Threads

/// The chunk store for async callers: the one boundary between Swift concurrency and the store's
/// blocking work (SQLite, pread, fsync). Every call runs on the front's own bounded executor, so
/// a serve handler or a publish never stalls the cooperative pool behind the writer lock. FUSE
/// worker threads and the CLI keep the synchronous API.
public struct StoreFront: Sendable {
  public let store: ChunkStore
  public let executor: BlockingExecutor

  public init(_ store: ChunkStore, executor: BlockingExecutor) {
    self.store = store
    self.executor = executor
  }

  /// Runs `body` with the store on the front's executor.
  public func run<T: Sendable>(_ body: @escaping @Sendable (ChunkStore) throws -> T) async throws -> T {
    let store = self.store
    return try await executor.run { try body(store) }
  }

  /// `run` for the store's own calls: what it throws is a `ChunkStoreError`.
  public func call<T: Sendable>(_ body: @escaping @Sendable (ChunkStore) throws -> T) async throws(ChunkStoreError) -> T {
    do {
      return try await run(body)
    } catch let e as ChunkStoreError {
      throw e
    } catch {
      throw .index(path: store.indexPath, operation: "async call", message: "\(error)")
    }
  }
}

extension ChunkStore {
  /// The store's async front, on `configuration.frontThreads` threads of its own (4 by default:
  /// as many as its readers can use on a small node; its writer is one connection anyway).
  public var async: StoreFront { StoreFront(self, executor: storeExecutor) }
}
