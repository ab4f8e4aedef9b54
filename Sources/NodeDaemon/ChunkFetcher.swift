import BinaryCache
import ChunkStore
import Foundation
import Threads
import Logging
import NixFormats
import StoreFS
import Synchronization

/// Why a chunk could not be had: every source failed, or sent other bytes twice.
public struct ChunkFetchFailure: Error, Sendable, CustomStringConvertible {
  public let chunk: ChunkID
  public let reason: String
  public var description: String { "chunk \(chunk): \(reason)" }
}

/// Fetches chunks by digest from the substituters that offer them, one request per chunk however
/// many readers wait for it, each checked by the chunk store before it is used or kept.
final class ChunkFetcher: Sendable {
  let cache: BinaryCacheClient
  let store: ChunkStore
  let logger: Logger
  private let inflight = SingleFlight<ChunkID, Result<Void, any Error>>()

  init(cache: BinaryCacheClient, store: ChunkStore, logger: Logger) {
    self.cache = cache
    self.store = store
    self.logger = logger
  }

  /// Returns once every chunk is in the store (or arriving there); throws the first failure.
  func fetch(_ refs: [ChunkRef]) async throws {
    let tasks = refs.map { ref in
      inflight.task(ref.id) { () async -> Result<Void, any Error> in
        do { return .success(try await self.fetchOne(ref)) } catch { return .failure(error) }
      }
    }
    var failure: (any Error)?
    for t in tasks {
      if case .failure(let error) = await t.value { failure = failure ?? error }
    }
    if let failure { throw failure }
  }

  /// From each source in turn; bytes that are not the chunk are fetched once more, then refused.
  private func fetchOne(_ ref: ChunkRef) async throws {
    let sources = await cache.chunkSources()
    var problems: [String] = []
    var rejected = 0
    for attempt in 0..<2 {
      for source in sources {
        do {
          guard let got = try await cache.fetchChunk(ref.id.hex, size: Int(ref.size), from: source) else {
            if attempt == 0 { problems.append("\(source): not there") }
            continue
          }
          _ = try await store.async.call { try $0.accept(ref.id, size: Int(ref.size), zstd: got.zstd, bytes: got.bytes, source: got.url) }
          FSMetrics.chunksFetched.increment()
          FSMetrics.chunkBytesFetched.increment(by: Int64(got.bytes.count))
          return
        } catch let e as ChunkStoreError {
          guard case .chunkRejected = e else { throw e }
          FSMetrics.chunksRejected.increment()
          cache.countFallThrough(source, cause: .chunkRejected)
          logger.warning("a fetched chunk did not verify", metadata: ["substituter": "\(source)", "error": "\(e)"])
          problems.append("\(e)")
          rejected += 1
          if rejected >= 2 { throw ChunkFetchFailure(chunk: ref.id, reason: problems.joined(separator: "; ")) }
        } catch {
          if let e = error as? CacheError { cache.countFallThrough(source, cause: FallThroughCause(e)) }
          problems.append("\(error)")
        }
      }
      if rejected == 0 { break }
    }
    throw ChunkFetchFailure(
      chunk: ref.id, reason: sources.isEmpty ? "no substituter offers chunks" : problems.joined(separator: "; "))
  }
}
