// The binary cache client: narinfo, NAR streams, decompression, verification, closures.
import CCurl
import Foundation
import Threads
import Logging
import NixFormats

/// One configured cache, with what its `nix-cache-info` says.
public struct Substituter: Sendable, Hashable, CustomStringConvertible {
  /// Base URL without a trailing slash or query.
  public let url: String
  /// Lower is tried first (the cache's `Priority`, or `?priority=` in the configuration).
  public let priority: Int
  /// Position in the configuration: the tie-breaker.
  public let position: Int
  /// The chunk index it offers (`nixfs/v1`, announced in `nix-cache-info`), if any.
  public var chunkIndex: String? = nil
  /// Whether it builds what nodes ask for (`NixfsBuild: nixfs/v1` in `nix-cache-info`).
  public var builds = false
  public var description: String { url }
}

/// A narinfo as a substituter served it, verified.
public struct CachedPathInfo: Sendable {
  public let info: NarInfo
  public let substituter: Substituter
  /// The trusted key whose signature verified; nil only with `requireSignatures` off.
  public let signer: String?
}

/// Lookups, closures and verified NAR streams from the configured substituters.
///
/// All network I/O runs on the client's own threads (see `Transport`); the async methods only
/// suspend. Safe to share between tasks.
public final class BinaryCacheClient: Sendable {
  public let configuration: CacheConfiguration
  let transport: Transport
  let trusted: TrustedKeys
  let narinfoCache: NarInfoCache
  let logger: Logger
  let urlPolicy: URLPolicy
  let metrics: CacheMetrics
  /// Each configured substituter's HTTP(S) or file base URL and `?priority=`, by position.
  let bases: [(base: String, priority: Int?)]
  /// Resolved substituters by configuration position, with when to ask again (nil: never).
  /// A cache that could not be reached is skipped for `unreachableRetrySeconds`, so a dead cache
  /// does not cost every lookup of a closure a round of connection retries.
  private let resolved = Locked<[Int: (Result<Substituter, CacheError>, Double?)]>([:])
  static let unreachableRetrySeconds = 30.0
  /// One lookup of a path at a time (many FUSE requests for the same new path).
  let inflight = SingleFlight<StorePath, Result<CachedPathInfo, CacheError>>()

  public static var userAgent: String {
    let curl = nixfs_curl_version_info().map { String(cString: $0.pointee.version) } ?? "unknown"
    return "nixfs/\(NixFSVersion.string) curl/\(curl)"
  }

  public init(configuration: CacheConfiguration, logger: Logger = Logger(label: "nixfs.cache")) throws(CacheError) {
    var config = configuration
    let environment = ProcessInfo.processInfo.environment
    if config.caFile == nil {
      config.caFile = environment["NIX_SSL_CERT_FILE"] ?? environment["SSL_CERT_FILE"]
    }
    var signers: [S3Signer] = []
    var bases: [(base: String, priority: Int?)] = []
    // Metrics name each substituter as configured, without its query (`s3://bucket`).
    var series: [(base: String, label: String)] = []
    for url in config.substituters {
      var target = Self.base(of: url)
      let label = target.base
      if url.hasPrefix("s3://") {
        let location = try S3Location(parsing: url)
        target.base = location.baseURL
        if let credentials = try S3Credentials.find(profile: location.profile, environment: environment) {
          signers.append(S3Signer(prefix: location.baseURL + "/", region: location.region, credentials: credentials))
        } else {
          logger.warning(
            "no AWS credentials found: requests to this bucket go unsigned, which only a public bucket answers (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile=)",
            metadata: ["substituter": "\(url)"])
        }
      } else if !(url.hasPrefix("http://") || url.hasPrefix("https://") || url.hasPrefix("file://")) {
        throw .invalidConfiguration("substituter '\(url)': only http://, https://, file:// and s3:// are supported")
      }
      bases.append(target)
      series.append((target.base, label))
    }
    self.bases = bases
    guard config.maxConnections >= 1, config.maxAttempts >= 1 else {
      throw .invalidConfiguration("maxConnections and maxAttempts must be at least 1")
    }
    self.configuration = config
    self.trusted = try config.trustedKeys()
    self.logger = logger
    self.urlPolicy = URLPolicy(extraHosts: config.narURLHosts)
    self.narinfoCache = try NarInfoCache(
      stateDirectory: config.stateDirectory, positiveTTL: config.narinfoCachePositiveTTL,
      negativeTTL: config.narinfoCacheNegativeTTL)
    let metrics = CacheMetrics(substituters: series)
    self.metrics = metrics
    self.transport = Transport(
      settings: TransportSettings(
        userAgent: Self.userAgent, connectTimeout: config.connectTimeout, stallTimeout: config.stallTimeout,
        lowSpeedLimit: config.lowSpeedLimit,
        netrcFile: config.netrcFile, caFile: config.caFile, maxConnections: config.maxConnections, signers: signers),
      observer: { url, outcome, bytes in metrics.record(url: url, outcome: outcome, bytes: bytes) })
    if !config.requireSignatures {
      logger.warning(
        "SIGNATURE CHECKING IS DISABLED (--no-require-sigs): any narinfo the substituters serve is accepted; use this only for private caches you control",
        metadata: ["substituters": "\(config.substituters.joined(separator: " "))"])
    } else if trusted.keys.isEmpty && !config.substituters.isEmpty {
      logger.warning("no trusted public keys are configured: every path will be refused (add --trusted-public-key)")
    }
  }

  // MARK: Substituters

  /// The usable substituters, best first: by priority, then configuration order.
  public func substituters() async -> [Substituter] {
    await resolveAll().compactMap { try? $0.get() }
  }

  /// Every configured substituter as configured (URL), with what its `nix-cache-info` said or why
  /// it is unusable; in configuration order. For `nixfs probe`.
  public func probeSubstituters() async -> [(url: String, result: Result<Substituter, CacheError>)] {
    let urls = configuration.substituters
    return await withTaskGroup(of: (Int, Result<Substituter, CacheError>).self) { group in
      for position in urls.indices { group.addTask { (position, await self.resolve(position: position)) } }
      var out: [(Int, Result<Substituter, CacheError>)] = []
      for await r in group { out.append(r) }
      return out.sorted { $0.0 < $1.0 }.map { (urls[$0.0], $0.1) }
    }
  }

  /// The configured substituters that are not usable now (unreachable, a malformed
  /// `nix-cache-info`, another store directory), spelled as configured.
  public func unusableSubstituters() async -> [String] {
    _ = await resolveAll()
    let table = resolved.withLock { $0 }
    return configuration.substituters.indices.compactMap { i in
      if case .failure = table[i]?.0 { configuration.substituters[i] } else { nil }
    }
  }

  /// Counts that `substituter` failed what it offered and the next source is tried
  /// (`nixfs_substituter_fallthroughs_total`), and says so in one warning line.
  public func fellThrough(_ substituter: Substituter, path: StorePath, cause: FallThroughCause, error: any Error) {
    countFallThrough(substituter, cause: cause)
    logger.warning(
      "substituter failed; trying the next source",
      metadata: [
        "path": "\(path)", "substituter": "\(substituter)", "cause": "\(cause.rawValue)", "error": "\(error)",
      ])
  }

  /// Counts a fall-through whose warning the caller writes itself.
  public func countFallThrough(_ substituter: Substituter, cause: FallThroughCause) {
    metrics.fellThrough(base: substituter.url, cause: cause)
  }

  /// The keys signatures are checked against (narinfos here; chunk indexes by the chunk store).
  public var trustedKeys: TrustedKeys { trusted }

  /// Whether any key is trusted (a client without one refuses every path).
  public var hasTrustedKeys: Bool { !trusted.keys.isEmpty }

  /// Every configured substituter, resolved or with why it is unusable, in lookup order.
  public func resolveAll() async -> [Result<Substituter, CacheError>] {
    let urls = configuration.substituters
    let now = Date().timeIntervalSince1970
    var table = resolved.withLock { $0 }.filter { $0.value.1.map { $0 > now } ?? true }.mapValues(\.0)
    if table.count < urls.count {
      let fresh = await withTaskGroup(of: (Int, Result<Substituter, CacheError>).self) { group in
        for position in urls.indices where table[position] == nil {
          group.addTask { (position, await self.resolve(position: position)) }
        }
        var fresh: [(Int, Result<Substituter, CacheError>)] = []
        for await r in group { fresh.append(r) }
        return fresh
      }
      for (position, result) in fresh {
        table[position] = result
        switch result {
        case .success, .failure(.storeDirMismatch), .failure(.malformedCacheInfo):
          resolved.withLock { $0[position] = (result, nil) }
        case .failure:
          resolved.withLock { $0[position] = (result, now + Self.unreachableRetrySeconds) }
        }
      }
    }
    return urls.indices.compactMap { table[$0] }.sorted { a, b in
      switch (a, b) {
      case (.success(let x), .success(let y)): (x.priority, x.position) < (y.priority, y.position)
      case (.success, .failure): true
      default: false
      }
    }
  }

  /// A configured substituter's base URL (no query, no trailing slash) and its `?priority=`.
  static func base(of configured: String) -> (base: String, priority: Int?) {
    var base = configured
    var priority: Int? = nil
    if let q = base.firstIndex(of: "?") {
      for param in base[base.index(after: q)...].split(separator: "&") {
        let kv = param.split(separator: "=", maxSplits: 1)
        if kv.count == 2 && kv[0] == "priority" { priority = Int(kv[1]) }
      }
      base = String(base[..<q])
    }
    while base.hasSuffix("/") { base.removeLast() }
    return (base, priority)
  }

  private func resolve(position: Int) async -> Result<Substituter, CacheError> {
    // An s3:// substituter is asked at its bucket's HTTP(S) URL.
    let (base, override) = bases[position]
    let infoURL = base + "/nix-cache-info"
    do {
      let text = try await fetchText(infoURL)
      var info = NixCacheInfo(storeDir: configuration.storeDir)
      if let text {
        do { info = try NixCacheInfo(parsing: text, source: infoURL) } catch {
          logger.error("substituter disabled", metadata: ["url": "\(base)", "error": "\(error)"])
          return .failure(.malformedCacheInfo(error))
        }
      }
      guard info.storeDir == configuration.storeDir else {
        let error = CacheError.storeDirMismatch(substituter: base, expected: configuration.storeDir, actual: info.storeDir)
        logger.error("\(error)")
        return .failure(error)
      }
      return .success(
        Substituter(
          url: base, priority: override ?? info.priority, position: position,
          chunkIndex: info.chunkIndex == ChunkIndexWire.prefix ? info.chunkIndex : nil,
          builds: info.builds == NixfsWire.version))
    } catch {
      logger.warning("cannot reach substituter", metadata: ["url": "\(base)", "error": "\(error)"])
      return .failure(error)
    }
  }
}
