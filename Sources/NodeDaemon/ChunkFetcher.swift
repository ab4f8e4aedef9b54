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

  /// Sources that answered the batch route with 404 (older serves): asked chunk by chunk.
  private let noBatches = Mutex<Set<String>>([])

  /// Returns once every chunk is in the store (or arriving there); throws the first failure.
  /// Several chunks not in flight yet go in one batch request; each that it does not deliver,
  /// verified, is fetched alone (with the fall-through of `fetchOne`).
  func fetch(_ refs: [ChunkRef]) async throws {
    let flying = Set(inflight.keys)
    let fresh = refs.filter { !flying.contains($0.id) }
    let batch: Task<Set<ChunkID>, Never>? = fresh.count > 1 ? Task { await self.fetchBatch(fresh) } : nil
    let tasks = refs.map { ref in
      inflight.task(ref.id) { () async -> Result<Void, any Error> in
        if let batch, await batch.value.contains(ref.id) { return .success(()) }
        do { return .success(try await self.fetchOne(ref)) } catch { return .failure(error) }
      }
    }
    var failure: (any Error)?
    for t in tasks {
      if case .failure(let error) = await t.value { failure = failure ?? error }
    }
    if let failure { throw failure }
  }

  /// One request for many chunks, from the best source that offers chunks: those accepted (each
  /// checked against its digest by the store), at most `ChunkBatch.maxChunks` per request.
  private func fetchBatch(_ refs: [ChunkRef]) async -> Set<ChunkID> {
    guard let source = await cache.chunkSources().first, !noBatches.withLock({ $0.contains(source.url) }) else { return [] }
    var accepted: Set<ChunkID> = []
    var from = 0
    while from < refs.count {
      let part = Array(refs[from..<min(refs.count, from + NixfsWire.ChunkBatch.maxChunks)])
      from += part.count
      guard let answer = await cache.fetchChunkBatch(part.map { ($0.id.hex, Int($0.size)) }, from: source) else {
        noBatches.withLock { _ = $0.insert(source.url) }
        logger.info("the chunk source has no batch route; fetching chunk by chunk", metadata: ["substituter": "\(source.url)"])
        return accepted
      }
      let sizes = Dictionary(part.map { ($0.id, $0.size) }, uniquingKeysWith: { a, _ in a })
      for frame in answer.frames where frame.encoding != .absent {
        let id = ChunkID(SHA256Digest(bytes: frame.digest))
        guard let size = sizes[id] else { continue }
        do {
          _ = try await store.async.call {
            try $0.accept(id, size: Int(size), zstd: frame.encoding == .zstd, bytes: frame.bytes, source: answer.url)
          }
          accepted.insert(id)
          FSMetrics.chunksFetched.increment()
          FSMetrics.chunkBytesFetched.increment(by: Int64(frame.bytes.count))
        } catch {
          if case .chunkRejected = error {
            FSMetrics.chunksRejected.increment()
            cache.countFallThrough(source, cause: .chunkRejected)
          }
          logger.warning("a chunk of a batch was not accepted", metadata: ["substituter": "\(source.url)", "error": "\(error)"])
        }
      }
      FSMetrics.chunkBatches.increment()
      if let failure = answer.failure {
        cache.countFallThrough(source, cause: FallThroughCause(failure))
        logger.warning(
          "a chunk batch ended early; the rest come chunk by chunk",
          metadata: ["substituter": "\(source.url)", "received": "\(answer.frames.count)", "error": "\(failure)"])
        return accepted
      }
    }
    return accepted
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
