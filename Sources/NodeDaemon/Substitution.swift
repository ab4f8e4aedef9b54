import BinaryCache
import ChunkStore
import Foundation
import Threads
import Logging
import NixFormats
import StoreFS
import Synchronization

/// The real materialiser: narinfo (signature checked) from the caches; then the path's chunk
/// index when its substituter offers one signed by a trusted key, else the NAR streamed through
/// the decompressor into a chunk-store ingest, committed only once its NarHash verified.
public final class Substitution: Materialiser, Sendable {
  public let cache: BinaryCacheClient
  public let store: ChunkStore
  let logger: Logger
  /// Use chunk indexes where offered (`--no-chunk-index` turns it off).
  let useChunkIndex: Bool
  let chunks: ChunkFetcher
  /// One whole-NAR completion per partial path at a time, however many reads wait on it.
  let refills = SingleFlight<StorePath, Result<Void, any Error>>()

  public init(cache: BinaryCacheClient, store: ChunkStore, useChunkIndex: Bool = true, logger: Logger) {
    self.cache = cache
    self.store = store
    self.useChunkIndex = useChunkIndex
    self.logger = logger
    chunks = ChunkFetcher(cache: cache, store: store, logger: logger)
  }

  @discardableResult
  public func materialise(_ path: StorePath, whole: Bool = false) async throws -> Manifest? {
    let seen: LocalPath
    do { seen = try await store.async.call { try $0.localState(of: path) } } catch { throw MaterialiseFailure.failed(path, cause: error) }
    switch seen {
    case .complete: return nil
    case .partial:
      if whole { try await complete(path) }
      return nil
    case .absent, .incomplete: break
    }
    let (manifest, partial) = try await fromSubstituters(path, seen: seen, indexes: useChunkIndex)
    if whole && partial { try await complete(path) }
    return manifest
  }

  /// Tries each substituter that has the path, best first, until one delivers it verified: its
  /// chunk index (registered partial), else its whole NAR. A substituter that fails (its narinfo,
  /// its NAR's hash or size, a corrupt, cut or stalled stream, an HTTP error after retries) is
  /// warned about, counted, and passed over; only when all failed does this throw, naming each
  /// cause. A local store failure ends the search: another cache would not mend it.
  func fromSubstituters(
    _ path: StorePath, seen: LocalPath?, indexes: Bool
  ) async throws(MaterialiseFailure) -> (Manifest, partial: Bool) {
    var failures: [CacheError] = []
    var asked: [String] = []
    var state = seen
    for entry in await cache.resolveAll() {
      let substituter: Substituter
      switch entry {
      case .success(let s): substituter = s
      case .failure(let e):
        failures.append(e)
        continue
      }
      asked.append(substituter.url)
      guard let info = await narInfo(path, from: substituter, failures: &failures) else { continue }
      if indexes, let partial = await registerFromIndex(info) { return (partial, true) }
      do throws(IngestFailure) {
        let committed = try await store.ingest(PathInfo(info.info), seen: state) { ingest in
          try await cache.fetchNAR(info, into: ingest)
        }
        FSMetrics.narBytesFetched.increment(by: Int64(info.info.narSize))
        FSMetrics.downloadBytes.increment(by: Int64(info.info.fileSize ?? info.info.narSize))
        return (committed, false)
      } catch {
        // The aborted ingest may have changed what the index holds: ask again next time.
        state = nil
        switch error {
        case .store(let e): throw .failed(path, cause: e)
        case .fetch(let e):
          let failure = e as? CacheError ?? .sink(url: substituter.url, error: e)
          cache.fellThrough(substituter, path: path, cause: FallThroughCause(failure), error: failure)
          failures.append(failure)
        }
      }
    }
    if failures.isEmpty { throw .notFound(path, cause: CacheError.notFound(storePath: path.path, substituters: asked)) }
    throw .failed(path, cause: failures.count == 1 ? failures[0] : CacheError.allSubstitutersFailed(storePath: path.path, failures: failures))
  }

  /// `substituter`'s narinfo of `path`; nil when it has none, or when the lookup failed (then
  /// warned about, counted and added to `failures`).
  func narInfo(_ path: StorePath, from substituter: Substituter, failures: inout [CacheError]) async -> CachedPathInfo? {
    do throws(CacheError) {
      return try await cache.narInfo(for: path, from: substituter)
    } catch {
      cache.fellThrough(substituter, path: path, cause: FallThroughCause(error), error: error)
      failures.append(error)
      return nil
    }
  }

  /// The path's chunk index, checked against the trusted keys and the narinfo; nil (and the
  /// whole NAR is fetched) when there is none or it does not verify.
  func verifiedIndex(_ info: CachedPathInfo) async -> Manifest? {
    guard info.substituter.chunkIndex != nil else { return nil }
    do {
      guard let document = try await cache.chunkIndexDocument(for: info) else { return nil }
      return try ChunkIndex.verify(document, trusting: cache.trustedKeys, for: info.info)
    } catch {
      FSMetrics.indexRefused.increment()
      cache.countFallThrough(info.substituter, cause: .indexRefused)
      logger.warning(
        "chunk index not used; fetching the whole NAR",
        metadata: ["path": "\(info.info.storePath)", "substituter": "\(info.substituter)", "error": "\(error)"])
      return nil
    }
  }

  /// Fetches what a partial path lacks, then makes it complete (its NarHash checked).
  func complete(_ path: StorePath) async throws {
    do {
      try await fetchChunks(try await store.async.call { try $0.absentChunks(of: path) }, for: path)
      try await store.async.call { try $0.completePartial(path) }
    } catch let e as MaterialiseFailure {
      throw e
    } catch {
      throw MaterialiseFailure.failed(path, cause: error)
    }
  }

  /// Chunks from the chunk sources; when one cannot be had (it failed its digest twice, or no
  /// source could send it), the partial path `path` is completed from a whole, verified NAR
  /// instead, and reads waiting on the chunk find it there.
  public func fetchChunks(_ refs: [ChunkRef], for path: StorePath?) async throws {
    do {
      try await chunks.fetch(refs)
    } catch let failure as ChunkFetchFailure {
      guard let path else { throw failure }
      try await refills.run(path) { () async throws(any Error) in try await self.refill(path, after: failure) }
    }
  }

  /// Completes the partial path `path` from the first substituter whose whole NAR verifies,
  /// cutting the chunks it lacks out of the stream (`PartialRefill`); the path stays servable
  /// meanwhile. A substituter whose NarHash is not the index's cannot fill it: when no other
  /// could, the path is fetched whole as if it had never been partial.
  func refill(_ path: StorePath, after cause: ChunkFetchFailure) async throws {
    logger.warning(
      "a chunk could not be had; completing the path from a whole NAR",
      metadata: ["path": "\(path)", "error": "\(cause)"])
    var failures: [CacheError] = []
    var otherNAR = false
    for substituter in await cache.substituters() {
      guard let sink = try await store.async.call({ try $0.refill(path, source: substituter.url) }) else { return }
      guard let info = await narInfo(path, from: substituter, failures: &failures) else { continue }
      guard info.info.narHash == sink.narHash else {
        otherNAR = true
        continue
      }
      do throws(CacheError) {
        try await cache.fetchNAR(info, into: sink)
      } catch {
        cache.fellThrough(substituter, path: path, cause: FallThroughCause(error), error: error)
        failures.append(error)
        continue
      }
      try await store.async.call { try $0.completePartial(path) }
      let (accepted, rejected) = sink.counts
      FSMetrics.narBytesFetched.increment(by: Int64(info.info.narSize))
      FSMetrics.downloadBytes.increment(by: Int64(info.info.fileSize ?? info.info.narSize))
      logger.info(
        "completed from a whole NAR",
        metadata: [
          "path": "\(path)", "substituter": "\(substituter)", "chunks": "\(accepted)", "refused": "\(rejected)",
        ])
      return
    }
    if otherNAR {
      _ = try await fromSubstituters(path, seen: nil, indexes: false)
      return
    }
    throw MaterialiseFailure.failed(
      path, cause: CacheError.allSubstitutersFailed(storePath: path.path, failures: failures + [.sink(url: "chunks", error: cause)]))
  }

  public func startupProfile(of root: StorePath) async -> [ChunkRef] {
    guard useChunkIndex, let source = await cache.chunkSources().first,
      let profile = await cache.startupProfile(of: root, from: source)
    else { return [] }
    return profile.entries.prefix(StartupProfile.limit).compactMap { e in
      ChunkID(hex: e.hex).map { ChunkRef(id: $0, size: UInt32(clamping: e.size)) }
    }
  }

  public func reportStartupProfile(_ refs: [ChunkRef], of root: StorePath) async {
    guard let source = await cache.chunkSources().first else { return }
    let profile = StartupProfile(chunks: refs.prefix(StartupProfile.limit).map { ($0.id.hex, Int($0.size)) })
    do {
      try await cache.sendStartupProfile(profile, of: root, to: source)
      logger.info("startup profile reported", metadata: ["path": "\(root)", "chunks": "\(refs.count)"])
    } catch {
      logger.warning("cannot report a startup profile", metadata: ["path": "\(root)", "error": "\(error)"])
    }
  }

  public func materialiseFromIndex(_ path: StorePath) async -> Bool {
    switch try? await store.async.call({ try $0.localState(of: path) }) {
    case .complete, .partial: return true
    case .absent, .incomplete, nil: break
    }
    guard let info = try? await cache.narInfo(for: path) else { return false }
    return await registerFromIndex(info) != nil
  }

  /// Registers the path partial from its verified chunk index, and returns it; nil (the caller
  /// fetches the whole NAR, or leaves the path for later) when there is none or the store
  /// refuses it.
  func registerFromIndex(_ info: CachedPathInfo) async -> Manifest? {
    guard useChunkIndex, let manifest = await verifiedIndex(info) else { return nil }
    do {
      // A writer transaction over the whole tree: off Swift concurrency's threads.
      try await store.async.call { try $0.registerPartial(manifest) }
    } catch {
      FSMetrics.indexRefused.increment()
      logger.warning(
        "chunk index not used; fetching the whole NAR", metadata: ["path": "\(info.info.storePath)", "error": "\(error)"])
      return nil
    }
    FSMetrics.pathsFromIndex.increment()
    logger.debug(
      "materialised from the chunk index", metadata: ["path": "\(info.info.storePath)", "substituter": "\(info.substituter)"])
    return manifest
  }

  /// Where a `fetchClosure` is: paths and NAR bytes done of those it has to fetch, and the path
  /// that just completed (nil for the first report).
  public struct Progress: Sendable {
    public var pathsDone = 0
    public var pathsTotal = 0
    public var bytesDone: UInt64 = 0
    public var bytesTotal: UInt64 = 0
    public var completed: StorePath?
  }

  /// Materialises the closures of `roots` eagerly and whole (`nixfs fetch`), `parallel` paths at a
  /// time; `progress` hears of the start and of every path done.
  public func fetchClosure(
    of roots: [StorePath], parallel: Int = 4, progress: (@Sendable (Progress) -> Void)? = nil
  ) async throws -> (paths: Int, fetched: Int, narBytes: UInt64) {
    let closure = try await cache.closure(of: roots)
    let missing = closure.keys.filter { !store.isComplete($0) }.sorted()
    let state = Mutex(Progress(pathsTotal: missing.count, bytesTotal: missing.reduce(0) { $0 + (closure[$1]?.info.narSize ?? 0) }))
    progress?(state.withLock { $0 })
    try await inParallel(missing, limit: parallel) { p in
      try await self.materialise(p, whole: true)
      let now = state.withLock { s -> Progress in
        s.pathsDone += 1
        s.bytesDone += closure[p]?.info.narSize ?? 0
        s.completed = p
        return s
      }
      progress?(now)
    }
    let fetched = missing.count
    let bytes = missing.reduce(UInt64(0)) { $0 + (closure[$1]?.info.narSize ?? 0) }
    return (closure.count, fetched, bytes)
  }
}
