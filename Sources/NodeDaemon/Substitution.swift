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
    do { seen = try store.localState(of: path) } catch { throw MaterialiseFailure.failed(path, cause: error) }
    switch seen {
    case .complete: return nil
    case .partial:
      if whole { try await complete(path) }
      return nil
    case .absent, .incomplete: break
    }
    let info: CachedPathInfo
    do {
      info = try await cache.narInfo(for: path)
    } catch {
      if case .notFound = error { throw MaterialiseFailure.notFound(path, cause: error) }
      throw MaterialiseFailure.failed(path, cause: error)
    }
    if let partial = await registerFromIndex(info) {
      if whole { try await complete(path) }
      return partial
    }
    let committed: Manifest
    do throws(IngestFailure) {
      committed = try await store.ingest(PathInfo(info.info), seen: seen) { ingest in try await cache.fetchNAR(info, into: ingest) }
    } catch {
      throw MaterialiseFailure.failed(path, cause: error)
    }
    FSMetrics.narBytesFetched.increment(by: Int64(info.info.narSize))
    FSMetrics.downloadBytes.increment(by: Int64(info.info.fileSize ?? info.info.narSize))
    return committed
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
      logger.warning(
        "chunk index not used; fetching the whole NAR",
        metadata: ["path": "\(info.info.storePath)", "substituter": "\(info.substituter)", "error": "\(error)"])
      return nil
    }
  }

  /// Fetches what a partial path lacks, then makes it complete (its NarHash checked).
  func complete(_ path: StorePath) async throws {
    do {
      try await fetchChunks(try store.absentChunks(of: path))
      try await blockingWork { [store] in try store.completePartial(path) }
    } catch let e as MaterialiseFailure {
      throw e
    } catch {
      throw MaterialiseFailure.failed(path, cause: error)
    }
  }

  public func fetchChunks(_ refs: [ChunkRef]) async throws { try await chunks.fetch(refs) }

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
    switch try? store.localState(of: path) {
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
      try store.registerPartial(manifest)
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
