// The binary cache client: narinfo, NAR streams, decompression, verification, closures.
import CCurl
import Foundation
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
  /// Each configured substituter's HTTP(S) or file base URL and `?priority=`, by position.
  let bases: [(base: String, priority: Int?)]
  /// Resolved substituters by configuration position, with when to ask again (nil: never).
  /// A cache that could not be reached is skipped for `unreachableRetrySeconds`, so a dead cache
  /// does not cost every lookup of a closure a round of connection retries.
  private let resolved = Locked<[Int: (Result<Substituter, CacheError>, Double?)]>([:])
  static let unreachableRetrySeconds = 30.0
  private let inflight = Locked<[StorePath: Task<Result<CachedPathInfo, CacheError>, Never>]>([:])

  public static var userAgent: String {
    let curl = nixfs_curl_version_info().map { String(cString: $0.pointee.version) } ?? "unknown"
    return "nixfs/\(NixFSVersion.string) curl/\(curl)"
  }

  public init(configuration: CacheConfiguration, logger: Logger = Logger(label: "nixfs.cache")) throws(CacheError) {
    var config = configuration
    if config.caFile == nil {
      let env = ProcessInfo.processInfo.environment
      config.caFile = env["NIX_SSL_CERT_FILE"] ?? env["SSL_CERT_FILE"]
    }
    var signers: [S3Signer] = []
    var bases: [(base: String, priority: Int?)] = []
    let environment = ProcessInfo.processInfo.environment
    for url in config.substituters {
      var target = Self.base(of: url)
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
    let metrics = CacheMetrics(
      substituters: zip(bases, config.substituters).map { ($0.base, Self.base(of: $1).base) })
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
      for (position, url) in urls.enumerated() { group.addTask { (position, await self.resolve(url, position: position)) } }
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

  /// The keys signatures are checked against (narinfos here; chunk indexes by the chunk store).
  public var trustedKeys: TrustedKeys { trusted }

  /// Whether any key is trusted (a client without one refuses every path).
  public var hasTrustedKeys: Bool { !trusted.keys.isEmpty }

  /// Every configured substituter, resolved or with why it is unusable, in lookup order.
  func resolveAll() async -> [Result<Substituter, CacheError>] {
    let urls = configuration.substituters
    let now = Date().timeIntervalSince1970
    var table = resolved.withLock { $0 }.filter { $0.value.1.map { $0 > now } ?? true }.mapValues(\.0)
    if table.count < urls.count {
      let fresh = await withTaskGroup(of: (Int, Result<Substituter, CacheError>).self) { group in
        for (position, url) in urls.enumerated() where table[position] == nil {
          group.addTask { (position, await self.resolve(url, position: position)) }
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

  private func resolve(_ configured: String, position: Int) async -> Result<Substituter, CacheError> {
    // An s3:// substituter is asked at its bucket's HTTP(S) URL.
    let (base, override) = position < bases.count ? bases[position] : Self.base(of: configured)
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
          chunkIndex: info.chunkIndex == ChunkIndexWire.prefix ? info.chunkIndex : nil))
    } catch {
      logger.warning("cannot reach substituter", metadata: ["url": "\(base)", "error": "\(error)"])
      return .failure(error)
    }
  }

  // MARK: narinfo

  /// The narinfo of `path` from the first substituter (in priority order) that has a valid one.
  /// A miss or a failure falls through to the next substituter. Concurrent lookups of one path
  /// (many FUSE requests for the same new path) share a single lookup.
  public func narInfo(for path: StorePath) async throws(CacheError) -> CachedPathInfo {
    let task = inflight.withLock { table in
      if let running = table[path] { return running }
      let task = Task { () async -> Result<CachedPathInfo, CacheError> in
        do throws(CacheError) { return .success(try await self.lookup(path)) } catch { return .failure(error) }
      }
      table[path] = task
      return task
    }
    let result = await task.value
    inflight.withLock { table in
      if table[path] == task { table[path] = nil }
    }
    return try result.get()
  }

  private func lookup(_ path: StorePath) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    for entry in await resolveAll() {
      let substituter: Substituter
      switch entry {
      case .success(let s): substituter = s
      case .failure(let e):
        failures.append(e)
        continue
      }
      asked.append(substituter.url)
      do {
        if let found = try await narInfo(for: path, from: substituter) { return found }
      } catch {
        logger.debug("narinfo lookup failed", metadata: ["path": "\(path)", "error": "\(error)"])
        failures.append(error)
      }
    }
    if failures.isEmpty {
      throw .notFound(storePath: path.path, substituters: asked)
    }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: path.path, failures: failures)
  }

  /// One substituter's answer: nil when it does not have the path.
  public func narInfo(for path: StorePath, from substituter: Substituter) async throws(CacheError) -> CachedPathInfo? {
    try await narInfo(hashPart: path.hashPart, expecting: path, from: substituter)
  }

  /// The narinfo of whichever path has this hash part (what a binary cache is asked for), from
  /// the first substituter that has a valid one; `notFound` when none has it.
  public func narInfo(hashPart: String) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    for entry in await resolveAll() {
      guard case .success(let substituter) = entry else { continue }
      asked.append(substituter.url)
      do {
        if let found = try await narInfo(hashPart: hashPart, expecting: nil, from: substituter) { return found }
      } catch {
        failures.append(error)
      }
    }
    let name = "\(configuration.storeDir)/\(hashPart)"
    if failures.isEmpty { throw .notFound(storePath: name, substituters: asked) }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: name, failures: failures)
  }

  private func narInfo(
    hashPart: String, expecting path: StorePath?, from substituter: Substituter
  ) async throws(CacheError) -> CachedPathInfo? {
    let url = "\(substituter.url)/\(hashPart).narinfo"
    switch narinfoCache.lookup(substituter: substituter.url, hashPart: hashPart) {
    case .absent:
      return nil
    case .present(let text):
      // Re-checked on every use: the trusted keys may have changed since it was stored.
      if let info = try? check(text, url: url, hashPart: hashPart, path: path, substituter: substituter) { return info }
    case nil: break
    }
    guard let text = try await fetchText(url) else {
      narinfoCache.store(substituter: substituter.url, hashPart: hashPart, .absent)
      return nil
    }
    let info = try check(text, url: url, hashPart: hashPart, path: path, substituter: substituter)
    narinfoCache.store(substituter: substituter.url, hashPart: hashPart, .present(text))
    return info
  }

  private func check(
    _ text: String, url: String, hashPart: String, path: StorePath?, substituter: Substituter
  ) throws(CacheError) -> CachedPathInfo {
    let info: NarInfo
    do { info = try NarInfo(parsing: text, source: url, storeDir: configuration.storeDir) } catch {
      throw .malformedNarInfo(error)
    }
    guard path.map({ info.storePath == $0 }) ?? (info.storePath.hashPart == hashPart) else {
      throw .wrongStorePath(url: url, expected: path?.path ?? "\(configuration.storeDir)/\(hashPart)-…", actual: info.storePath.path)
    }
    if configuration.requireSignatures {
      do {
        let signer = try info.verify(trusting: trusted)
        return CachedPathInfo(info: info, substituter: substituter, signer: signer)
      } catch { throw .untrusted(url: url, error: error) }
    }
    return CachedPathInfo(info: info, substituter: substituter, signer: trusted.validSigner(of: info.fingerprint, signatures: info.signatures))
  }

  /// The narinfos of `roots` and everything they reference, transitively. Lookups run in parallel
  /// (up to `maxConnections` at once) over the transport's kept-alive connections.
  /// A substituter that offers chunk indexes answers a whole closure in one request
  /// (`nixfs/v1/closure`); each narinfo in it is checked as if fetched alone, and whatever it
  /// lacks is looked up as usual.
  public func closure(of roots: [StorePath]) async throws(CacheError) -> [StorePath: CachedPathInfo] {
    var result: [StorePath: CachedPathInfo] = [:]
    if let source = await chunkSources().first {
      for root in roots { result.merge(await closureInOneRequest(root, from: source)) { a, _ in a } }
    }
    var seen = Set(roots).union(result.keys)
    var pending = Array(Set(roots).subtracting(result.keys)).sorted()
    for info in result.values {
      for ref in info.info.references where seen.insert(ref).inserted { pending.append(ref) }
    }
    let width = configuration.maxConnections
    let outcome: CacheError? = await withTaskGroup(of: Result<CachedPathInfo, CacheError>.self) { group in
      var inFlight = 0
      while true {
        while inFlight < width, let next = pending.popLast() {
          inFlight += 1
          group.addTask {
            do throws(CacheError) { return .success(try await self.narInfo(for: next)) } catch { return .failure(error) }
          }
        }
        guard let done = await group.next() else { return nil }
        inFlight -= 1
        switch done {
        case .failure(let error):
          group.cancelAll()
          return error
        case .success(let found):
          result[found.info.storePath] = found
          for ref in found.info.references where seen.insert(ref).inserted { pending.append(ref) }
        }
      }
    }
    if let outcome { throw outcome }
    return result
  }

  /// The closure of `root` as `source`'s closure endpoint gives it, each narinfo checked (and
  /// remembered like any other); empty when the request or its answer is unusable.
  func closureInOneRequest(_ root: StorePath, from source: Substituter) async -> [StorePath: CachedPathInfo] {
    struct Answer: Decodable { var narinfos: [String: String] }
    let url = "\(source.url)/\(ChunkIndexWire.prefix)/closure/\(root.hashPart)"
    let answer: Answer
    do {
      guard let got = try await fetchBytes(url, limit: 64 << 20) else { return [:] }
      answer = try JSONDecoder().decode(Answer.self, from: Data(got.bytes))
    } catch {
      logger.warning("closure endpoint not usable; asking path by path", metadata: ["url": "\(url)", "error": "\(error)"])
      return [:]
    }
    var out: [StorePath: CachedPathInfo] = [:]
    for (hashPart, text) in answer.narinfos {
      let narinfoURL = "\(source.url)/\(hashPart).narinfo"
      do throws(CacheError) {
        let info = try check(text, url: narinfoURL, hashPart: hashPart, path: nil, substituter: source)
        narinfoCache.store(substituter: source.url, hashPart: hashPart, .present(text))
        out[info.info.storePath] = info
      } catch {
        logger.warning("a narinfo of a closure answer was refused", metadata: ["url": "\(narinfoURL)", "error": "\(error)"])
      }
    }
    return out
  }

  // MARK: NAR download

  /// Streams the NAR of `path` to `sink`, decompressed, from the substituter that served the
  /// narinfo. Returns only once FileSize/FileHash (when present) and NarSize/NarHash verified;
  /// when it throws, `sink` must discard what it got.
  public func fetchNAR(_ path: CachedPathInfo, into sink: any NARSink) async throws(CacheError) {
    try await fetchNAR(path.info, from: path.substituter, into: sink)
  }

  public func fetchNAR(
    _ info: NarInfo, from substituter: Substituter, into sink: any NARSink
  ) async throws(CacheError) {
    try await download(info, from: substituter, into: sink, sinkHasData: false)
  }

  /// Looks the path up and streams its NAR; a substituter that fails (not only one that misses)
  /// falls through to the next one that has the path, and the sink is reset in between.
  @discardableResult
  public func fetchNAR(for path: StorePath, into sink: any NARSink) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    var sinkHasData = false
    for entry in await resolveAll() {
      guard case .success(let substituter) = entry else { continue }
      asked.append(substituter.url)
      do {
        guard let found = try await narInfo(for: path, from: substituter) else { continue }
        try await download(found.info, from: substituter, into: sink, sinkHasData: sinkHasData)
        return found
      } catch {
        logger.warning("substituter failed; trying the next", metadata: ["path": "\(path)", "error": "\(error)"])
        failures.append(error)
        sinkHasData = true
      }
    }
    if failures.isEmpty { throw .notFound(storePath: path.path, substituters: asked) }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: path.path, failures: failures)
  }

  /// The whole NAR in memory, verified (tests, small paths).
  public func narBytes(_ path: CachedPathInfo) async throws(CacheError) -> [UInt8] {
    let buffer = NARBuffer()
    try await fetchNAR(path, into: buffer)
    return buffer.bytes
  }

  /// Where the NAR of `info` is fetched from, by the rules of `URLPolicy`.
  public func narURL(_ info: NarInfo, from substituter: Substituter) throws(CacheError) -> String {
    try urlPolicy.narURL(info.url, substituter: substituter.url)
  }

  private func download(
    _ info: NarInfo, from substituter: Substituter, into sink: any NARSink, sinkHasData: Bool
  ) async throws(CacheError) {
    let url: String
    do { url = try narURL(info, from: substituter) } catch {
      logger.error("NAR URL refused", metadata: ["path": "\(info.storePath)", "error": "\(error)"])
      throw error
    }
    let state = try NARDownload(info: info, url: url, sink: sink, sinkHasData: sinkHasData)
    // Only HTTP can resume; a file:// read that failed simply starts again.
    let resumable = url.hasPrefix("http://") || url.hasPrefix("https://")
    let started = Date()
    do {
      try await withRetries(url) { () async throws(CacheError) in
        let offset = resumable ? state.received : 0
        if offset > 0 {
          logger.info("resuming NAR download", metadata: ["url": "\(LogText.bounded(url))", "offset": "\(offset)"])
        }
        let head = try await transport.get(
          url, from: offset,
          onStart: { head in try state.start(head, requested: offset) },
          onData: { bytes in try state.consume(bytes) },
          onEnd: { try state.finish() })
        if !head.isSuccess { throw .httpStatus(url: url, status: head.status, attempts: 1) }
      }
    } catch {
      logger.error("NAR download failed", metadata: ["path": "\(info.storePath)", "error": "\(error)"])
      throw error
    }
    logger.debug(
      "NAR verified",
      metadata: [
        "path": "\(info.storePath)", "narSize": "\(info.narSize)", "compression": "\(info.compression)",
        "seconds": "\(Date().timeIntervalSince(started))", "resumes": "\(state.resumes)",
        "restarts": "\(state.restarts)",
      ])
  }

  // MARK: Plumbing

  /// GETs a small text file (narinfo, nix-cache-info), with retries. nil for a miss: 404, or 403
  /// as S3 answers for absent keys (Nix treats both as "not there").
  func fetchText(_ url: String, limit: Int = 8 << 20) async throws(CacheError) -> String? {
    try await fetchBytes(url, limit: limit).map { String(decoding: $0.bytes, as: UTF8.self) }
  }

  /// Runs `body` until it succeeds, fails for good, or runs out of attempts. Waits grow
  /// exponentially with ±50% jitter, so many clients retrying one cache do not synchronise.
  func withRetries<T>(_ url: String, _ body: () async throws(CacheError) -> T) async throws(CacheError) -> T {
    var attempt = 1
    while true {
      do {
        return try await body()
      } catch {
        guard error.isRetryable, attempt < configuration.maxAttempts, !Task.isCancelled else {
          throw error.withAttempts(attempt)
        }
        let delay = configuration.retryBaseDelay * Double(1 << min(attempt - 1, 10)) * Double.random(in: 0.5...1.5)
        logger.warning(
          "transfer failed; retrying",
          metadata: [
            "url": "\(LogText.bounded(url))", "attempt": "\(attempt)", "delay": "\(delay)", "error": "\(error)",
          ])
        do { try await Task.sleep(nanoseconds: UInt64(delay * 1e9)) } catch { throw .cancelled(url: url) }
        attempt += 1
      }
    }
  }
}

/// A value behind a lock, for state shared with transport threads.
final class Locked<Value>: @unchecked Sendable {
  private let lock = NSLock()
  private var value: Value
  init(_ value: Value) { self.value = value }
  func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
    lock.lock()
    defer { lock.unlock() }
    return try body(&value)
  }
}
