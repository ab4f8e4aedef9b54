import BinaryCache
import ChunkStore
import Crypto
import Foundation
import Threads
import FuseMount
import Logging
import NixFormats
import NixState
import NodeControl
import StoreFS
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// The node daemon: the FUSE mount plus the control socket through which the CSI plugin
/// publishes views. One per state directory (the chunk store's writer lock enforces it).
public final class Daemon: Sendable {
  public let mountpoint: String
  public let stateDir: String
  let cache: BinaryCacheClient
  let store: ChunkStore
  public let filesystem: StoreFileSystem
  let mount: FuseMount
  let logger: Logger
  /// The settings in effect and where each came from, for `nixfs status`.
  public let settings: [DaemonStatus.Setting]

  public init(
    mountpoint: String, stateDir: String, cache: BinaryCacheClient, store: ChunkStore, options: StoreFSOptions,
    settings: [DaemonStatus.Setting] = [], logger: Logger
  ) {
    self.settings = settings
    self.mountpoint = (mountpoint as NSString).standardizingPath
    self.stateDir = stateDir
    self.cache = cache
    self.store = store
    self.logger = logger
    var options = options
    options.statfsPath = stateDir
    filesystem = StoreFileSystem(
      store: store, materialiser: Substitution(cache: cache, store: store, useChunkIndex: options.useChunkIndex, logger: logger),
      options: options,
      logger: logger)
    mount = FuseMount(filesystem)
  }

  public var controlSocket: String { ControlSocket.path(stateDir: stateDir) }

  /// Mounts (or serves the connection `source` hands over), serves the control socket, and
  /// blocks until unmounted, signalled, or taken over. With `keeper` (a `nixfs keeper` socket),
  /// the keeper holds a duplicate of the connection, and a signal leaves the mount to it.
  /// `onServing` runs once the connection is served.
  public func run(source: MountSource = .fresh, keeper: String? = nil, onServing: @escaping @Sendable () -> Void = {})
    throws -> ServeOutcome
  {
    let control = try ControlServer(path: controlSocket) { [self] request in
      if case .takeover(let format, let version, let mountpoint) = request {
        return takeover(format: format, version: version, mountpoint: mountpoint)
      }
      return ControlReply(await handle(request))
    }
    defer { control.stop() }
    let holding = KeeperHolding(socket: keeper, logger: logger)
    let outcome = try mount.serve(
      at: mountpoint, source: source, stateDir: stateDir, keepMountOnSignal: keeper != nil
    ) { record, fd in
      holding.start(record, fd)
      onServing()
    }
    holding.stop(release: outcome == .unmounted)
    return outcome
  }

  /// A successor's offer: hand the connection over unless it cannot be served the same way.
  func takeover(format: Int, version: String, mountpoint: String) -> ControlReply {
    logger.info("a successor asks for the FUSE connection", metadata: ["version": "\(version)", "format": "\(format)"])
    guard format == Handover.currentFormat else {
      return ControlReply(
        .failed(
          .invalidArgument,
          "handover format \(format) is not this daemon's (format \(Handover.currentFormat), nixfs \(NixFSVersion.string)); "
            + "it keeps serving: stop it and mount again to change versions"))
    }
    guard (mountpoint as NSString).standardizingPath == self.mountpoint else {
      return ControlReply(.failed(.invalidArgument, "the daemon of state directory \(stateDir) serves \(self.mountpoint), not \(mountpoint); it keeps serving"))
    }
    guard let (handover, fd) = mount.handOver() else {
      return ControlReply(.failed(.unavailable, "the running daemon could not stop serving in time; it keeps serving"))
    }
    return ControlReply(ControlResponse(handover: handover), descriptor: fd) { [mount] sent in
      mount.finishHandover(succeeded: sent)
    }
  }

  /// View directory names are volume IDs when those are plain, else a digest of them.
  static func viewName(_ volumeID: String) -> String {
    let plain = volumeID.utf8.allSatisfy {
      ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5a) || ($0 >= 0x61 && $0 <= 0x7a) || $0 == 0x2d || $0 == 0x5f
        || $0 == 0x2e
    }
    if plain && !volumeID.isEmpty && volumeID.utf8.count <= 128 && volumeID.first != "." { return volumeID }
    return "v-" + SHA256.hash(data: Array(volumeID.utf8)).map { String(format: "%02x", $0) }.joined().prefix(40)
  }

  public func handle(_ request: ControlRequest) async -> ControlResponse {
    switch request {
    case .ping:
      return ControlResponse(mountpoint: mountpoint)
    case .views:
      return ControlResponse(views: Dictionary(uniqueKeysWithValues: filesystem.viewIDs().map { ($0, $0) }))
    case .unpublish(let volumeID):
      let name = Self.viewName(volumeID)
      filesystem.removeView(id: name)
      do { try await store.async.call { try $0.unpinAll(holder: volumeID) } } catch {
        logger.error("cannot unpin", metadata: ["volume": "\(volumeID)", "error": "\(error)"])
      }
      return ControlResponse()
    case .fetch(let texts, let parallel):
      let roots: [StorePath]
      do { roots = try texts.map { try StorePath($0) } } catch { return .failed(.invalidArgument, "\(error)") }
      let closure: [StorePath]
      do throws(CacheError) {
        closure = try await cache.closure(of: roots).keys.sorted()
      } catch {
        return .failed(Self.failure(error), "\(error)")
      }
      do {
        let fetched = try await filesystem.prefetch(closure, parallel: parallel)
        logger.info("prefetched", metadata: ["roots": "\(texts)", "closure": "\(closure.count)", "fetched": "\(fetched)"])
        return ControlResponse(closure: closure.map(\.path), fetched: fetched)
      } catch {
        return .failed(.unavailable, "\(error)")
      }
    case .gc(let budget):
      do {
        let r = try await store.async.call { try $0.collectGarbage(maxStoredBytes: budget) }
        logger.info("gc through the control socket", metadata: ["evicted": "\(r.evicted.count)", "freed": "\(r.freedBytes)"])
        return ControlResponse(report: Self.gcLines(r))
      } catch {
        return .failed(.internalError, "\(error)")
      }
    case .takeover:
      return .failed(.invalidArgument, "a takeover needs the control socket's descriptor passing")
    case .status:
      return ControlResponse(status: await status())
    case .build(let request):
      do throws(CacheError) {
        var r = ControlResponse()
        r.build = try await cache.requestBuild(request)
        return r
      } catch {
        return .failed(Self.failure(error), "the cluster cache's builder does not answer: \(error)")
      }
    case .fsck:
      do {
        let r = try await store.async.call { try $0.fsck(repair: false) }
        return ControlResponse(report: Self.fsckLines(r), consistent: r.isConsistent)
      } catch {
        return .failed(.internalError, "\(error)")
      }
    case .publish(let volumeID, let text, let startupProfile):
      let path: StorePath
      do { path = try StorePath(text) } catch { return .failed(.invalidArgument, "\(error)") }
      let infos: [StorePath: PathInfo]
      do {
        infos = try await self.closureInfos(of: path)
      } catch let e as CacheError {
        return .failed(Self.failure(e), Self.naming(path, e))
      } catch {
        return .failed(.internalError, Self.naming(path, error))
      }
      let closure = infos.keys.sorted()
      do {
        try await store.async.call { try $0.pin(closure, holder: volumeID) }
      } catch {
        return .failed(.internalError, "\(path): cannot pin the closure: \(error)")
      }
      // Nix's database for the closure, from the narinfos already here (no round trip), made
      // while the trees warm.
      let stateDir = self.stateDir
      let making = Task { () async throws -> String in
        try await blockingWork { try StateLayer.ensure(stateDir: stateDir, result: path, closure: infos.values.map(Self.validPath)) }
      }
      await filesystem.warm(closure)
      let nixState: String
      switch await making.result {
      case .success(let s): nixState = s
      case .failure(let error):
        _ = try? await store.async.call { try $0.unpinAll(holder: volumeID) }
        return .failed(.internalError, "\(path): cannot make the Nix database for its closure: \(error)")
      }
      if startupProfile ?? true { filesystem.startPod(root: path, closure: closure) }
      let name = Self.viewName(volumeID)
      filesystem.addView(StoreView(id: name, closure: closure, result: path))
      logger.info("view published", metadata: ["volume": "\(volumeID)", "path": "\(path)", "closure": "\(closure.count)"])
      return ControlResponse(
        viewPath: "\(mountpoint)/\(StoreFileSystem.viewsDirName)/\(name)", closure: closure.map(\.path), nixState: nixState)
    }
  }

  /// A path's row in Nix's database, from what its narinfo said.
  static func validPath(_ info: PathInfo) -> ValidPath {
    ValidPath(
      path: info.storePath, narHash: info.narHash, narSize: info.narSize, references: info.references,
      deriver: info.deriver, signatures: info.signatures, ca: info.ca)
  }

  /// Sets the gauges a scrape reads: stored bytes, the budget (0: none), pinned and partial paths.
  public func refreshGauges() {
    FSMetrics.storeBytes.record(Int64((try? store.storedBytes()) ?? 0))
    FSMetrics.budgetBytes.record(Int64(store.configuration.maxStoredBytes ?? 0))
    FSMetrics.pinnedPaths.record(Int64(store.pinnedPathCount()))
    FSMetrics.partialPaths.record(Int64(store.partialPathCount()))
    FSMetrics.buildInfo.record(1)
  }

  func status() async -> DaemonStatus {
    let usable = await cache.substituters()
    let unreachable = await cache.unusableSubstituters()
    let stats = try? store.stats()
    var s = DaemonStatus(
      version: NixFSVersion.description, pid: getpid(), mountpoint: mountpoint, stateDir: stateDir, settings: settings,
      substituters: usable.map { DaemonStatus.Substituter(url: $0.url, priority: $0.priority, chunkIndex: $0.chunkIndex) },
      unreachable: unreachable, views: filesystem.viewIDs(), fetchesInFlight: filesystem.fetchesInFlight().map(\.path),
      paths: stats?.paths ?? 0, partialPaths: stats?.partialPaths ?? 0, storedBytes: (try? store.storedBytes()) ?? 0,
      budgetBytes: store.configuration.maxStoredBytes, chunksToFetch: stats?.absentChunks ?? 0)
    s.passthrough = filesystem.passthroughStatus
    return s
  }

  /// What `nixfs gc` prints, from the daemon or from a store it opened itself.
  public static func gcLines(_ r: GCReport) -> [String] {
    ["evicted \(r.evicted.count) paths, freed \(r.freedBytes) bytes; stored \(r.storedBytesBefore) -> \(r.storedBytesAfter) bytes"]
      + r.evicted.map { "  \($0)" }
  }

  /// What `nixfs fsck` prints.
  public static func fsckLines(_ r: FsckReport) -> [String] {
    r.repaired.map { "repaired: \($0)" } + r.problems.map { "problem: \($0)" }
      + [
        "checked \(r.pathsChecked) paths, \(r.contentsChecked) contents, \(r.chunksChecked) chunks: "
          + (r.isConsistent ? "consistent" : "\(r.problems.count) problems")
      ]
  }

  /// The error's text, prefixed with the path unless it already names it (most cache errors do).
  static func naming(_ path: StorePath, _ error: any Error) -> String {
    let text = "\(error)"
    return text.contains(path.baseName) ? text : "\(path): \(text)"
  }

  static func failure(_ e: CacheError) -> ControlFailure {
    switch e {
    case .notFound: .notFound
    case .untrusted: .untrusted
    case .allSubstitutersFailed(_, let failures):
      failures.allSatisfy { if case .notFound = $0 { true } else { false } } ? .notFound
        : failures.contains { if case .untrusted = $0 { true } else { false } } ? .untrusted : .unavailable
    case .httpStatus, .network, .stalled: .unavailable
    default: .internalError
    }
  }

  /// The closure of `path` with what each member's narinfo said: from the local index when every
  /// member is here (no network on a warm node), otherwise from the caches' narinfos.
  func closureInfos(of path: StorePath) async throws -> [StorePath: PathInfo] {
    var infos: [StorePath: PathInfo] = [:]
    var queue = [path]
    var local = true
    while let p = queue.popLast() {
      guard infos[p] == nil else { continue }
      guard let tree = try? store.servableTree(of: p) else {
        local = false
        break
      }
      infos[p] = tree.info
      queue.append(contentsOf: tree.info.references.filter { infos[$0] == nil })
    }
    if local { return infos }
    return try await cache.closure(of: [path]).mapValues { PathInfo($0.info) }
  }
}
