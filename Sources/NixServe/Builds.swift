import BinaryCache
import ChunkStore
import Foundation
import Logging
import NixFormats
import Subprocess
import Synchronization
import Threads

#if canImport(System)
  import System
#else
  import SystemPackage
#endif

/// How `nixfs serve --build` runs Nix.
public struct BuildSettings: Sendable {
  /// The directory holding `nix`, `nix-build` and `nix-store` (Debian's nix-bin: /usr/bin).
  public var nixDirectory: String
  /// The builder's own store (a chroot store), its settings, home and logs live here.
  public var directory: String
  /// Nix's substituters and trusted keys: the serve's upstreams, so dependencies are substituted.
  public var substituters: [String]
  public var trustedKeys: [String]
  public var timeout: Double
  public var maxBuilds: Int
  /// How long a request waits for its build before it answers `building` (kubelet retries).
  public var wait: Double
  /// Nix's `sandbox` setting for builds: true, false or relaxed.
  public var sandbox: String
  /// Nix's remote builders (`builders`), passed through as Nix reads them.
  public var builders: String?
  /// The serve's key: what it builds it signs.
  public var key: SecretKey
  public var credentials: UploadCredentials

  public init(
    nixDirectory: String, directory: String, substituters: [String], trustedKeys: [String], timeout: Double,
    maxBuilds: Int, wait: Double, sandbox: String, builders: String?, key: SecretKey, credentials: UploadCredentials
  ) {
    (self.nixDirectory, self.directory, self.substituters, self.trustedKeys) = (nixDirectory, directory, substituters, trustedKeys)
    (self.timeout, self.maxBuilds, self.wait, self.sandbox, self.builders) = (timeout, maxBuilds, wait, sandbox, builders)
    (self.key, self.credentials) = (key, credentials)
  }

  var store: String { directory + "/store" }
}

/// Why a build did not give a path.
struct BuildFailure: Error, CustomStringConvertible {
  let description: String
  let timedOut: Bool
}

/// `nixfs serve --build`: the one place the cluster evaluates and builds, with Nix itself doing
/// the work in a store of the serve's own. One build per expression, flake output or derivation
/// at a time across the cluster (every node asks the same serve); each output and its closure
/// then enters the chunk store verified against what Nix recorded, its narinfo signed with the
/// serve's key, and is served lazily like any pulled-through path. A failed build leaves nothing
/// but its log.
public final class Builder: Sendable {
  public let settings: BuildSettings
  let cache: PullThroughCache
  let logger: Logger
  private let jobs = Mutex<[String: Job]>([:])
  private let slots: Slots

  struct Job: Sendable {
    let what: String
    let started: ContinuousClock.Instant
    var outcome: Outcome?
    /// Unlocked flakes and impure expressions are evaluated again after a while.
    let keepFor: Duration
  }

  enum Outcome: Sendable {
    case built(StorePath, at: ContinuousClock.Instant)
    case failed(String, at: ContinuousClock.Instant)
  }

  /// A failure is answered for a minute, so kubelet's retries see it, then built again.
  static let failureMemory: Duration = .seconds(60)
  /// How many requests' results are remembered at most.
  static let remembered = 10_000

  public init(settings: BuildSettings, cache: PullThroughCache, logger: Logger) throws {
    self.settings = settings
    self.cache = cache
    self.logger = logger
    slots = Slots(settings.maxBuilds)
    for dir in [settings.store, settings.directory + "/conf", settings.directory + "/home", settings.directory + "/nars"] {
      try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    }
    // Only these settings: nothing of the machine's (/etc/nix, ~/.config) plays a part.
    var conf = """
      build-users-group =
      sandbox = \(settings.sandbox)
      experimental-features = nix-command flakes
      substituters = \(settings.substituters.joined(separator: " "))
      trusted-public-keys = \(settings.trustedKeys.joined(separator: " "))
      require-sigs = true

      """
    if let b = settings.builders { conf += "builders = \(b)\n" }
    try conf.write(toFile: settings.directory + "/conf/nix.conf", atomically: true, encoding: .utf8)
  }

  /// The request's build: started unless one runs or has answered recently; waits up to
  /// `settings.wait` for it. Returns the HTTP status with the answer.
  public func request(_ r: NixfsWire.BuildRequest) async -> (status: Int, answer: NixfsWire.BuildAnswer) {
    let (key, what, keepFor): (String, String, Duration)
    do { (key, what, keepFor) = try Self.describe(r) } catch {
      return (400, .init(state: "failed", what: "?", message: "\(error)"))
    }
    let now = ContinuousClock.now
    let start = jobs.withLock { jobs -> Bool in
      if let job = jobs[key] {
        switch job.outcome {
        case nil: return false
        case .built(_, let at) where now - at < job.keepFor: return false
        case .failed(_, let at) where now - at < Self.failureMemory: return false
        default: break
        }
      }
      // Remembered results are a bounded cache: past the bound the oldest finished ones go
      // (asked again, they are built again, or answered from the store at once).
      if jobs.count >= Self.remembered {
        let finished = jobs.filter { $0.value.outcome != nil }.sorted { $0.value.started < $1.value.started }
        for (old, _) in finished.prefix(jobs.count - Self.remembered + 1) { jobs[old] = nil }
      }
      jobs[key] = Job(what: what, started: now, outcome: nil, keepFor: keepFor)
      return true
    }
    if start {
      logger.info("build requested", metadata: ["what": "\(what)", "pod": "\(r.pod ?? "?")", "namespace": "\(r.namespace ?? "?")"])
      Task { await self.run(key, r, what: what) }
    }
    let deadline = ContinuousClock.now + .milliseconds(Int64(settings.wait * 1000))
    while true {
      guard let job = jobs.withLock({ $0[key] }) else { break }
      switch job.outcome {
      case .built(let path, _): return (200, .init(state: "done", what: what, storePath: path.path))
      case .failed(let message, _): return (422, .init(state: "failed", what: what, message: message))
      case nil:
        if ContinuousClock.now >= deadline {
          let seconds = (ContinuousClock.now - job.started) / .seconds(1)
          return (202, .init(state: "building", what: what, seconds: (seconds * 10).rounded() / 10))
        }
        try? await Task.sleep(for: .milliseconds(50))
      }
    }
    return (500, .init(state: "failed", what: what, message: "the build vanished"))
  }

  /// Builds running now.
  public var running: Int { jobs.withLock { $0.values.filter { $0.outcome == nil }.count } }

  /// The request's key (what one build is for), a description for logs and answers, and how long
  /// its output is trusted to stay what it names.
  static func describe(_ r: NixfsWire.BuildRequest) throws -> (String, String, Duration) {
    let given = [r.nixExpr, r.flakeRef, r.derivation].compactMap { $0 }
    guard given.count == 1 else { throw BuildFailure(description: "a build request names exactly one of nixExpr, flakeRef, derivation", timedOut: false) }
    if let e = r.nixExpr {
      guard e.utf8.count <= 32 << 10 else { throw BuildFailure(description: "nixExpr is over 32 KiB", timedOut: false) }
      // Impure: what it reads may change; built again after ten minutes.
      return ("expr:" + e, "nixExpr \(LogText.bounded(e, limit: 120))", .seconds(600))
    }
    if let f = r.flakeRef {
      guard f.utf8.count <= 4096, !f.contains(where: { $0.isWhitespace || $0.isNewline }) else {
        throw BuildFailure(description: "flakeRef '\(LogText.bounded(f, limit: 120))' is not a flake reference", timedOut: false)
      }
      // A locked reference (a revision or a NAR hash) names one output for good.
      let locked = f.contains("rev=") || f.contains("narHash=") || f.range(of: #"/[0-9a-f]{40}"#, options: .regularExpression) != nil
      return ("flake:" + f, "flakeRef \(f)", locked ? .seconds(365 * 86400) : .seconds(600))
    }
    let d = r.derivation!
    guard let path = try? StorePath(d), path.name.hasSuffix(".drv") else {
      throw BuildFailure(description: "derivation '\(LogText.bounded(d, limit: 200))' is not a .drv store path", timedOut: false)
    }
    return ("drv:" + path.path, "derivation \(path.path)", .seconds(365 * 86400))
  }

  private func run(_ key: String, _ r: NixfsWire.BuildRequest, what: String) async {
    await slots.acquire()
    cache.counters.buildsRunning.set(Double(running))
    let started = ContinuousClock.now
    let result = await build(r)
    await slots.release()
    let seconds = (ContinuousClock.now - started) / .seconds(1)
    cache.counters.buildSeconds.increment(by: seconds)
    let outcome: Outcome
    switch result {
    case .success(let path):
      outcome = .built(path, at: .now)
      cache.counters.builds["succeeded"]?.increment()
      logger.info("built", metadata: ["what": "\(what)", "path": "\(path)", "seconds": "\(seconds)"])
    case .failure(let f):
      outcome = .failed(f.description, at: .now)
      cache.counters.builds[f.timedOut ? "timeout" : "failed"]?.increment()
      logger.warning("build failed", metadata: ["what": "\(what)", "seconds": "\(seconds)", "error": "\(f.description)"])
    }
    jobs.withLock { $0[key]?.outcome = outcome }
    cache.counters.buildsRunning.set(Double(running))
  }

  /// Realises what `r` names with Nix, then brings the output's closure into the chunk store.
  func build(_ r: NixfsWire.BuildRequest) async -> Result<StorePath, BuildFailure> {
    let store = ["--store", settings.store]
    let argv: [String]
    if let e = r.nixExpr {
      argv = ["nix-build", "--no-out-link"] + store + ["-E", e]
    } else if let f = r.flakeRef {
      argv = ["nix", "build", "--no-link", "--print-out-paths"] + store + [f]
    } else {
      argv = ["nix-store", "--realise"] + store + [r.derivation!]
    }
    let built = await nix(argv, timeout: settings.timeout)
    if built.timedOut {
      return .failure(BuildFailure(description: "the build did not finish within \(Int(settings.timeout)) s (--build-timeout); it was killed", timedOut: true))
    }
    guard built.status == 0 else { return .failure(BuildFailure(description: Self.explain(built.stderr), timedOut: false)) }
    let outputs = built.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    guard let last = outputs.last, let out = try? StorePath(last) else {
      return .failure(BuildFailure(description: "Nix printed no output path: \(LogText.bounded(built.stdout, limit: 300))", timedOut: false))
    }
    do {
      try await bringIn(out)
    } catch {
      return .failure(BuildFailure(description: "\(out) was built, but cannot be stored: \(error)", timedOut: false))
    }
    return .success(out)
  }

  /// The closure of `out` from the builder's store into the chunk store: each path verified
  /// against what Nix recorded (NarHash, NarSize, references), its narinfo signed by the serve.
  func bringIn(_ out: StorePath) async throws {
    let store = ["--store", settings.store]
    let closure = await nix(["nix-store", "--query", "--requisites"] + store + [out.path], timeout: 600)
    guard closure.status == 0 else { throw BuildFailure(description: Self.explain(closure.stderr), timedOut: false) }
    let paths = try closure.stdout.split(separator: "\n").map { try StorePath(String($0)) }
    let missing = try await cache.query { s in paths.filter { !s.isComplete($0) } }
    guard !missing.isEmpty else { return }
    let described = await nix(["nix", "path-info", "--json"] + store + missing.map(\.path), timeout: 600)
    guard described.status == 0 else { throw BuildFailure(description: Self.explain(described.stderr), timedOut: false) }
    struct Described: Decodable {
      var path: String
      var narHash: String
      var narSize: UInt64
      var references: [String]?
      var deriver: String?
      var ca: String?
      var signatures: [String]?
    }
    let infos = try JSONDecoder().decode([Described].self, from: Data(described.stdout.utf8))
    for d in infos {
      let path = try StorePath(d.path)
      var info = NarInfo(
        storePath: path, url: "nar/\(path.hashPart).nar", narHash: try NixHash(parsing: d.narHash), narSize: d.narSize,
        references: try (d.references ?? []).map { try StorePath($0) }, deriver: d.deriver.map { ($0 as NSString).lastPathComponent },
        signatures: (d.signatures ?? []).compactMap { try? NarSignature(parsing: $0) }, ca: d.ca)
      info.signatures.append(settings.key.sign(info.fingerprint))
      let file = settings.directory + "/nars/\(path.hashPart)-\(UUID().uuidString.prefix(8)).nar"
      defer { try? FileManager.default.removeItem(atPath: file) }
      let dumped = await nix(["nix-store", "--dump", "\(settings.store)\(path.path)"], timeout: 3600, stdoutFile: file)
      guard dumped.status == 0 else { throw BuildFailure(description: Self.explain(dumped.stderr), timedOut: false) }
      try await cache.ingest(info, narFile: file, source: "build of \(path)")
      cache.forgetMiss(hashPart: path.hashPart)
    }
  }

  struct Run: Sendable {
    var status: Int32
    var timedOut: Bool
    var stdout: String
    var stderr: String
  }

  /// Runs a Nix command of `settings.nixDirectory` with a clean environment (only the builder's
  /// own settings, home and cache), at most `timeout` seconds (coreutils' timeout: TERM, then KILL
  /// 5 s later). Both outputs read as they come; stdout to `stdoutFile` when given.
  func nix(_ argv: [String], timeout: Double, stdoutFile: String? = nil) async -> Run {
    let tool = (settings.nixDirectory as NSString).appendingPathComponent(argv[0])
    let environment: [[UInt8]] = [
      "PATH=\(settings.nixDirectory):/usr/bin:/bin", "HOME=\(settings.directory)/home",
      "NIX_CONF_DIR=\(settings.directory)/conf", "NIX_USER_CONF_FILES=", "XDG_CACHE_HOME=\(settings.directory)/home/.cache",
      "NIX_REMOTE=",
    ].map { Array("\($0)\0".utf8) }  // as execve takes them: NUL-terminated
    let arguments = Arguments(["--kill-after=5", String(format: "%.3f", timeout), tool] + argv.dropFirst())
    do {
      let status: TerminationStatus
      var out = ""
      let err: String
      if let stdoutFile {
        let fd = try FileDescriptor.open(
          FilePath(stdoutFile), .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite])
        let r = try await Subprocess.run(
          .path(FilePath("/usr/bin/timeout")), arguments: arguments, environment: .custom(environment),
          output: .fileDescriptor(fd, closeAfterSpawningProcess: true), error: .string(limit: 4 << 20))
        (status, err) = (r.terminationStatus, r.standardError)
      } else {
        let r = try await Subprocess.run(
          .path(FilePath("/usr/bin/timeout")), arguments: arguments, environment: .custom(environment),
          output: .string(limit: 16 << 20), error: .string(limit: 4 << 20))
        (status, out, err) = (r.terminationStatus, r.standardOutput, r.standardError)
      }
      switch status {
      case .exited(let code): return Run(status: code, timedOut: code == 124 || code == 137, stdout: out, stderr: err)
      case .signaled(let signal): return Run(status: 128 + signal, timedOut: signal == SIGKILL, stdout: out, stderr: err)
      }
    } catch {
      return Run(status: -1, timedOut: false, stdout: "", stderr: "error: cannot run \(tool): \(error)")
    }
  }

  /// Nix's `error:` lines and the log's last lines, bounded and escaped, for a person to act on.
  static func explain(_ stderr: String) -> String {
    let lines = stderr.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    let errors = lines.filter { $0.hasPrefix("error:") }
    let tail = lines.suffix(12).filter { !errors.contains($0) }
    let text = (errors + (tail.isEmpty ? [] : ["last lines of the log:"] + tail)).joined(separator: "\n")
    // Bounded so that the answer, JSON-escaped, fits the 4 KiB a node keeps of an error's body.
    return LogText.bounded(text.isEmpty ? "the build failed and said nothing" : text, limit: 2500)
  }
}

/// At most N builds at once; the others wait their turn.
actor Slots {
  private var free: Int
  private var waiting: [CheckedContinuation<Void, Never>] = []

  init(_ n: Int) { free = max(1, n) }

  func acquire() async {
    if free > 0 {
      free -= 1
      return
    }
    await withCheckedContinuation { waiting.append($0) }
  }

  func release() {
    if waiting.isEmpty { free += 1 } else { waiting.removeFirst().resume() }
  }
}
