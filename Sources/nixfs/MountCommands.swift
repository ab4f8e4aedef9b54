import ArgumentParser
import BinaryCache
import ChunkStore
import CoreMetrics
import Foundation
import Logging
import NixFormats
import NodeControl
import Prometheus
import FuseMount
import NodeDaemon
import StoreFS
import Synchronization

struct MountCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mount",
    abstract: "Mount a read-only /nix/store that fetches store paths from binary caches on first access.",
    discussion: """
      Runs in the foreground until SIGTERM/SIGINT/SIGHUP or `fusermount3 -u MOUNTPOINT`, and unmounts \
      cleanly. MOUNTPOINT may be /nix/store itself. One daemon per state directory. \
      Started while another daemon serves the same state directory and mountpoint, it takes the \
      mount over without unmounting (an upgrade or a change of flags that pods never notice). \
      With --keeper, a crash or restart of the daemon leaves the mount to the keeper, and the next \
      daemon picks it up.
      """)

  enum AfterTakeover: String, ExpressibleByArgument, CaseIterable {
    case exit, wait
  }

  @OptionGroup var cache: CacheOptions
  @Option(help: "Serve Prometheus metrics on ADDR:PORT (e.g. 0.0.0.0:9464).") var metricsListen: String?
  @Option(help: "Keep the chunk store under this size, evicting least recently used paths (e.g. 50G).")
  var maxSize: String?
  @Option(help: "FUSE worker threads.") var threads: Int = 16
  @Option(help: "Seconds the kernel and the daemon remember that a path is in no cache.")
  var negativeTimeout: Double = 30
  @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
  @Option(help: "Log lines as text, or as one JSON object each (json).") var logFormat: LogFormat = .text
  @Flag(help: "Mount over a live mount or a non-empty directory, hiding what is there.") var allowNonEmpty = false
  @Flag(help: "Fetch whole NARs even where a substituter offers a signed chunk index (no chunk-lazy paths).")
  var noChunkIndex = false
  @Option(help: "Seconds after a publish whose chunk fetches make the pod's startup profile, reported to the chunk source (0: off).")
  var startupProfileSeconds: Double = 10
  @Option(
    help: ArgumentHelp(
      "The socket of a `nixfs keeper`, which holds the FUSE connection so that a crash or restart of this daemon never breaks a pod.",
      valueName: "socket"))
  var keeper: String?
  @Option(
    help: "After handing the mount to a successor: exit (0), or wait idle until terminated (in a DaemonSet pod, where an exit would be restarted)."
  )
  var afterTakeover: AfterTakeover = .exit
  @Option(
    help: ArgumentHelp(
      "A file that exists while this daemon serves the mount (a readiness probe's test).", valueName: "path"))
  var readyFile: String?
  enum PassthroughMode: String, ExpressibleByArgument, CaseIterable {
    case auto, off
  }
  @Option(
    help: "FUSE passthrough (Linux 6.9+): the kernel reads complete files straight from plain backing files under the state directory (auto), or every read goes through the daemon (off)."
  )
  var passthrough: PassthroughMode = .auto
  @Option(help: "Files smaller than this are read through the daemon, not passed through.")
  var passthroughMinSize: String = "64K"
  @Option(help: "Disk the backing files may take, least recently opened removed first (their own budget, beside --max-size).")
  var passthroughMaxSize: String = "8G"
  @Argument(help: "Where to mount the store.") var mountpoint: String

  func validate() throws {
    try checkLogLevel(logLevel)
    guard threads > 0 else { throw ValidationError("--threads \(threads): expected at least 1") }
  }

  func run() throws {
    let logger = bootstrapLogging(level: logLevel, label: "nixfs.mount", format: logFormat)
    let registry = PrometheusCollectorRegistry()
    MetricsSystem.bootstrap(DescribedMetricsFactory(registry: registry, help: FSMetrics.help.merging(CacheMetrics.help) { a, _ in a }))
    var maxBytes: UInt64? = nil
    if let maxSize {
      guard let n = parseSize(maxSize) else { fail("--max-size \(maxSize): expected a size such as 50G") }
      maxBytes = n
    }
    // Everything that can fail on bad flags or configuration fails here, before a running daemon
    // is asked for its connection: a successor that cannot serve never stops the one that does.
    let client: BinaryCacheClient
    do { client = try cache.client(logger: logger) } catch { fail("\(error)") }
    if let metricsListen {
      do { _ = try MetricsEndpoint.parse(metricsListen) } catch { fail("\(error)") }
    }
    let source = connectionSource(logger: logger)
    // A new mount binds now (a busy port fails before anything is mounted); a successor only once
    // the daemon it took over from has let go of the port.
    let metrics = Mutex<MetricsEndpoint?>(nil)
    // Gauges read from the daemon's state at each scrape, once there is a daemon.
    let gauges = Mutex<(@Sendable () -> Void)?>(nil)
    let beforeScrape: @Sendable () -> Void = { gauges.withLock { $0 }?() }
    if let metricsListen {
      if case .fresh = source {
        do { try metrics.withLock {
          $0 = try MetricsEndpoint(listen: metricsListen, registry: registry, logger: logger, beforeScrape: beforeScrape)
        } } catch {
          fail("\(error)")
        }
      } else {
        Thread.detachNewThread {
          var last = ""
          for _ in 0..<60 {
            do {
              let endpoint = try MetricsEndpoint(
                listen: metricsListen, registry: registry, logger: logger, beforeScrape: beforeScrape)
              metrics.withLock { $0 = endpoint }
              return
            } catch {
              last = "\(error)"
              usleep(250_000)
            }
          }
          logger.error("serving without metrics", metadata: ["error": "\(last)"])
        }
      }
    }
    let store: ChunkStore
    do {
      store = try openStore(maxBytes: maxBytes, waitForLock: { if case .adopted = source { true } else { false } }())
    } catch {
      fail("\(error)")
    }
    var options = StoreFSOptions()
    options.maxThreads = threads
    options.negativeTimeout = negativeTimeout
    options.allowNonEmpty = allowNonEmpty
    options.useChunkIndex = !noChunkIndex
    options.startupProfileSeconds = startupProfileSeconds
    if passthrough == .auto {
      var p = PassthroughOptions(directory: (cache.stateDir as NSString).appendingPathComponent("backing"))
      guard let min = parseSize(passthroughMinSize) else { fail("--passthrough-min-size \(passthroughMinSize): expected a size such as 64K") }
      guard let max = parseSize(passthroughMaxSize) else { fail("--passthrough-max-size \(passthroughMaxSize): expected a size such as 8G") }
      p.minSize = min
      p.maxBytes = max
      options.passthrough = p
    }
    let own: [DaemonStatus.Setting] = [
      .init(name: "max-size", value: maxSize ?? "unlimited", source: maxSize == nil ? "default" : "flag"),
      .init(name: "chunk-index", value: noChunkIndex ? "off" : "on", source: noChunkIndex ? "flag" : "default"),
      .init(name: "startup-profile-seconds", value: "\(startupProfileSeconds)", source: startupProfileSeconds == 10 ? "default" : "flag"),
      .init(name: "keeper", value: keeper ?? "none", source: keeper == nil ? "default" : "flag"),
      .init(name: "threads", value: "\(threads)", source: threads == 16 ? "default" : "flag"),
      .init(name: "passthrough", value: passthrough.rawValue, source: passthrough == .auto ? "default" : "flag"),
    ]
    let daemon = Daemon(
      mountpoint: mountpoint, stateDir: cache.stateDir, cache: client, store: store, options: options,
      settings: ((try? cache.settings()) ?? []) + own, logger: logger)
    gauges.withLock { $0 = { daemon.refreshGauges() } }
    // One line that says what this daemon is and runs with, for whoever reads the log first.
    logger.info(
      "nixfs mount starting",
      metadata: [
        "version": "\(NixFSVersion.description)", "mountpoint": "\(mountpoint)", "state_dir": "\(cache.stateDir)",
        "substituters": "\(client.configuration.substituters.joined(separator: " "))",
        "trusted_keys": "\(client.configuration.trustedPublicKeys.map { $0.split(separator: ":").first.map(String.init) ?? "?" }.joined(separator: " "))",
        "max_size": "\(maxBytes.map(String.init) ?? "unlimited")", "chunk_index": "\(!noChunkIndex)",
        "source": "\({ if case .fresh = source { "new mount" } else { "taken over" } }())",
      ])
    let outcome: ServeOutcome
    do {
      outcome = try daemon.run(source: source, keeper: keeper) { [readyFile] in
        if let readyFile { _ = FileManager.default.createFile(atPath: readyFile, contents: Data("\(getpid())\n".utf8)) }
        SystemdNotify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=serving \(mountpoint)")
      }
    } catch {
      if let readyFile { unlink(readyFile) }
      fail("\(error)")
    }
    if let readyFile { unlink(readyFile) }
    SystemdNotify.send("STOPPING=1")
    metrics.withLock { $0?.stop() }
    if outcome == .handedOver && afterTakeover == .wait { idleAfterTakeover() }
    // Exit now: a successor waits for the store's lock, and tasks of this daemon have nobody to answer.
    Glibc.exit(0)
  }

  /// The connection to serve: the running daemon's (takeover), the keeper's (after a crash), or a
  /// new mount.
  func connectionSource(logger: Logger) -> MountSource {
    let socket = ControlSocket.path(stateDir: cache.stateDir)
    let control = ControlClient(path: socket)
    if FileManager.default.fileExists(atPath: socket), (try? control.send(.ping, timeout: 2)) != nil {
      // Tests inject an incompatible successor through this variable.
      let format = ProcessInfo.processInfo.environment["NIXFS_TEST_HANDOVER_FORMAT"].flatMap(Int.init) ?? Handover.currentFormat
      let answer: (ControlResponse, Int32?)
      do {
        answer = try control.exchange(
          .takeover(format: format, version: NixFSVersion.string, mountpoint: mountpoint), timeout: 30)
      } catch {
        fail("a daemon serves \(cache.stateDir) but the takeover failed: \(error)")
      }
      guard let handover = answer.0.handover, let fd = answer.1 else {
        if let fd = answer.1 { close(fd) }
        fail("the running daemon refused the takeover: \(answer.0.message ?? "no reason given")")
      }
      return .adopted(handover, descriptor: fd)
    }
    if let keeper, FileManager.default.fileExists(atPath: keeper) {
      let k = KeeperClient(path: keeper)
      if let (r, fd) = try? k.exchange(.give, timeout: 5), let handover = r.handover, let fd {
        let here = (mountpoint as NSString).standardizingPath
        if (handover.mountpoint as NSString).standardizingPath == here && Mountpoint.hasNixFSMount(at: here)
          && handover.format == Handover.currentFormat
        {
          logger.info("picking up the FUSE connection the keeper held", metadata: ["connection": "\(handover.connection)"])
          return .adopted(handover, descriptor: fd)
        }
        // Not this mount (another mountpoint, or it was unmounted): let it go, mount afresh.
        logger.warning(
          "the keeper held a connection that is not mounted at \(here); releasing it",
          metadata: ["connection": "\(handover.connection)"])
        close(fd)
        _ = try? k.send(.release(connection: handover.connection), timeout: 5)
      }
    }
    return .fresh
  }

  /// Opens the store; after a takeover, waits for the previous daemon to release its lock.
  func openStore(maxBytes: UInt64?, waitForLock: Bool) throws(ChunkStoreError) -> ChunkStore {
    let deadline = Date().addingTimeInterval(waitForLock ? 30 : 0)
    while true {
      do {
        return try ChunkStore(.init(stateDirectory: cache.stateDir, maxStoredBytes: maxBytes))
      } catch {
        guard case .locked = error, Date() < deadline else { throw error }
      }
      usleep(5_000)
    }
  }

  /// Replaces this process with an idle one: the store, its lock and the connection are closed
  /// (close-on-exec), and kubelet sees a running container until the pod is deleted.
  func idleAfterTakeover() -> Never {
    let args = ["nixfs", "idle"]
    var cArgs = args.map { strdup($0) } + [nil]
    execv("/proc/self/exe", &cArgs)
    fail("cannot wait idle after the takeover: \(String(cString: strerror(errno)))")
  }
}

/// Logs to stderr, one line per event with its metadata (structured, greppable).
