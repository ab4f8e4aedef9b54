import BinaryCache
import ChunkStore
import Foundation
import Threads
import Logging
import NixFormats
import Prometheus
import Synchronization

/// Why the serve cannot answer for a path, as it maps to an HTTP status.
public enum ServeError: Error, Sendable, CustomStringConvertible {
  /// Not a valid hash part or NAR name (400).
  case badRequest(String)
  /// No upstream has it (404; remembered for the negative TTL).
  case notFound(String)
  /// An upstream failed, or what it sent did not verify (502; not remembered, nothing stored).
  case upstream(String)
  /// The local store failed (500).
  case store(String)
  /// No credentials, or a narinfo signed by no trusted key (403).
  case forbidden(String)

  public var description: String {
    switch self {
    case .badRequest(let s), .notFound(let s), .upstream(let s), .store(let s), .forbidden(let s): s
    }
  }
}

/// The read side of `nixfs serve`: answers narinfo and NAR requests from the chunk store, pulling
/// a missing path through from the upstream substituters first. Upstream narinfos are checked
/// against the trusted keys and every NAR against its NarHash and NarSize before a byte of it is
/// stored or served; concurrent requests for one path share one upstream download; a path held
/// costs no upstream request; misses are remembered for `negativeTTL` seconds.
public final class PullThroughCache: Sendable {
  public let store: ChunkStore
  public let upstream: BinaryCacheClient
  public let negativeTTL: Double
  let logger: Logger
  private let inflight = SingleFlight<String, Result<StorePath, ServeError>>()
  private let misses: NegativeCache<String>
  public let counters = ServeCounters()

  public init(store: ChunkStore, upstream: BinaryCacheClient, negativeTTL: Double = 60, logger: Logger) {
    self.store = store
    self.upstream = upstream
    self.negativeTTL = negativeTTL
    misses = NegativeCache(lifetime: .milliseconds(Int64(negativeTTL * 1000)))
    self.logger = logger
  }

  /// The path with `hashPart`, complete in the store once this returns.
  public func path(hashPart: String) async throws(ServeError) -> StorePath {
    guard Self.isHashPart(hashPart) else { throw .badRequest("'\(LogText.bounded(hashPart))' is not a store path hash") }
    if let held = try await held(hashPart: hashPart) {
      counters.hits.increment()
      return held
    }
    if misses.contains(hashPart) {
      counters.misses.increment()
      throw .notFound("\(hashPart): in no upstream substituter (remembered)")
    }
    return try await inflight.value(hashPart) { await self.pull(hashPart) }.get()
  }

  /// A path arrived by upload: a remembered miss no longer holds.
  func forgetMiss(hashPart: String) { misses.forget(hashPart) }

  private func pull(_ hashPart: String) async -> Result<StorePath, ServeError> {
    // Another request may have finished the same pull between our check and this task.
    do throws(ServeError) {
      if let held = try await held(hashPart: hashPart) { return .success(held) }
    } catch {
      return .failure(error)
    }
    let found: CachedPathInfo
    do {
      found = try await upstream.narInfo(hashPart: hashPart)
    } catch {
      if case .notFound = error {
        misses.remember(hashPart)
        counters.misses.increment()
        return .failure(.notFound("\(error)"))
      }
      logger.warning("upstream narinfo failed", metadata: ["hash": "\(hashPart)", "error": "\(error)"])
      return .failure(.upstream("\(error)"))
    }
    do throws(IngestFailure) {
      _ = try await store.ingest(PathInfo(found.info)) { ingest in try await upstream.fetchNAR(found, into: ingest) }
    } catch {
      switch error {
      case .fetch(let e):
        logger.error("upstream NAR refused", metadata: ["path": "\(found.info.storePath)", "error": "\(e)"])
        return .failure(.upstream("\(e)"))
      case .store(let e):
        return .failure(.store("\(e)"))
      }
    }
    counters.pulled.increment()
    counters.upstreamBytes.increment(by: Int64(found.info.fileSize ?? found.info.narSize))
    logger.info(
      "pulled through", metadata: ["path": "\(found.info.storePath)", "narSize": "\(found.info.narSize)", "from": "\(found.substituter)"])
    return .success(found.info.storePath)
  }

  /// The narinfo this cache serves for a complete path: the upstream's signatures (they cover
  /// only path, NarHash, NarSize and references, which stay), an uncompressed NAR named by its
  /// NarHash, so the URL of one NAR never changes and HTTP caches may keep it forever.
  public func narInfo(of path: StorePath) async throws(ServeError) -> String {
    guard let info = try await info(of: path) else { throw .store("\(path) vanished from the store") }
    return Self.narInfo(path, info).serialized
  }

  /// A held path's narinfo as this cache serves it (see `served`).
  static func narInfo(_ path: StorePath, _ info: PathInfo) -> NarInfo {
    served(
      NarInfo(
        storePath: path, url: "", narHash: info.narHash, narSize: info.narSize,
        references: info.references, deriver: info.deriver,
        signatures: info.signatures.compactMap { try? NarSignature(parsing: $0) }, ca: info.ca))
  }

  /// The upstream's narinfo with this cache's NAR: uncompressed, named by its NarHash. Everything
  /// Nix's fingerprint covers stays, so the upstream's signatures still verify.
  static func served(_ info: NarInfo) -> NarInfo {
    var out = info
    out.url = narURL(info.storePath, narHash: info.narHash.nix32)
    out.compression = .none
    out.fileHash = nil
    out.fileSize = nil
    return out
  }

  /// The narinfos of the closure of the path with `hashPart`, as this cache serves them (held
  /// paths from the store, the others from the upstreams' verified narinfos, with this cache's NAR
  /// URLs: a NAR request for a path not held yet pulls it through). One request for a whole
  /// closure, for a node publishing a volume; no NAR is downloaded for it.
  public func closure(hashPart: String) async throws(ServeError) -> (root: StorePath, narinfos: [StorePath: String]) {
    guard Self.isHashPart(hashPart) else { throw .badRequest("'\(LogText.bounded(hashPart))' is not a store path hash") }
    let root: StorePath
    if let held = try await held(hashPart: hashPart) {
      root = held
    } else {
      do { root = try await upstream.narInfo(hashPart: hashPart).info.storePath } catch {
        if case .notFound = error { throw .notFound("\(error)") }
        throw .upstream("\(error)")
      }
    }
    var out: [StorePath: String] = [:]
    var layer = [root]
    var seen: Set<StorePath> = [root]
    while !layer.isEmpty {
      let found = await withTaskGroup(of: (StorePath, Result<(String, [StorePath]), ServeError>).self) { group in
        for path in layer { group.addTask { (path, await self.closureEntry(path)) } }
        var all: [(StorePath, Result<(String, [StorePath]), ServeError>)] = []
        for await r in group { all.append(r) }
        return all
      }
      var next: [StorePath] = []
      for (path, result) in found {
        let (text, refs) = try result.get()
        out[path] = text
        for r in refs where seen.insert(r).inserted { next.append(r) }
      }
      layer = next
    }
    return (root, out)
  }

  private func closureEntry(_ path: StorePath) async -> Result<(String, [StorePath]), ServeError> {
    do throws(ServeError) {
      if let info = try await info(of: path) { return .success((Self.narInfo(path, info).serialized, info.references)) }
    } catch {
      return .failure(error)
    }
    do {
      let i = try await upstream.narInfo(for: path).info
      return .success((Self.served(i).serialized, i.references))
    } catch {
      if case .notFound = error { return .failure(.notFound("\(error)")) }
      return .failure(.upstream("\(error)"))
    }
  }

  /// `nar/<hash part>-<NarHash digest in nix32>.nar`.
  static func narURL(_ path: StorePath, narHash: String) -> String {
    let digest = narHash.split(separator: ":").last.map(String.init) ?? narHash
    return "nar/\(path.hashPart)-\(digest).nar"
  }

  /// The complete path a NAR file name stands for, pulled through first if not held yet (a node
  /// may ask for the NAR of a path it learnt of through the closure endpoint).
  public func narPath(fileName: String) async throws(ServeError) -> StorePath {
    guard fileName.hasSuffix(".nar") else { throw .badRequest("'\(LogText.bounded(fileName))' is not a NAR name") }
    let stem = fileName.dropLast(4)
    let parts = stem.split(separator: "-", maxSplits: 1)
    guard parts.count == 2, Self.isHashPart(String(parts[0])) else {
      throw .badRequest("'\(LogText.bounded(fileName))' is not a NAR name")
    }
    let path = try await self.path(hashPart: String(parts[0]))
    guard let info = try await info(of: path), info.narHash.nix32Digest == parts[1] else {
      throw .notFound("no NAR \(LogText.bounded(fileName)) here")
    }
    return path
  }

  /// The held path whose NarHash has this nix32 digest (the chunk index is keyed by NarHash, so
  /// one index serves every cache that holds the same NAR).
  public func heldPath(narHashDigest digest: String) async throws(ServeError) -> StorePath? {
    guard digest.utf8.count == 52, Nix32.isValid(digest) else { return nil }
    return try await query { try $0.completePath(narHash: "sha256:" + digest) }
  }

  /// A query of the store through its async front (never on Swift concurrency's threads); a
  /// failing index is a store error, never "not held".
  func query<T: Sendable>(_ body: @escaping @Sendable (ChunkStore) throws -> T) async throws(ServeError) -> T {
    do { return try await store.async.run(body) } catch { throw .store("\(error)") }
  }

  func held(hashPart: String) async throws(ServeError) -> StorePath? {
    try await query { try $0.completePath(hashPart: hashPart) }
  }

  func info(of path: StorePath) async throws(ServeError) -> PathInfo? { try await query { try $0.pathInfo(of: path) } }

  /// 32 characters of Nix's base-32 alphabet.
  static func isHashPart(_ s: String) -> Bool {
    s.utf8.count == 32 && Nix32.isValid(s)
  }
}
