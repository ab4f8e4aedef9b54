import ArgumentParser
import BinaryCache
import ChunkStore
import CoreMetrics
import Foundation
import Logging
import NixFormats
import Prometheus
import StoreFS

struct MountCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mount",
    abstract: "Mount a read-only /nix/store that fetches store paths from binary caches on first access.",
    discussion: """
      Runs in the foreground until SIGTERM/SIGINT/SIGHUP or `fusermount3 -u MOUNTPOINT`, and unmounts \
      cleanly. MOUNTPOINT may be /nix/store itself. One daemon per state directory.
      """)

  @OptionGroup var cache: CacheOptions
  @Option(help: "Serve Prometheus metrics on ADDR:PORT (e.g. 0.0.0.0:9464).") var metricsListen: String?
  @Option(help: "Keep the chunk store under this size, evicting least recently used paths (e.g. 50G).")
  var maxSize: String?
  @Option(help: "FUSE worker threads.") var threads: Int = 16
  @Option(help: "Seconds the kernel and the daemon remember that a path is in no cache.")
  var negativeTimeout: Double = 30
  @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
  @Flag(help: "Mount over a live mount or a non-empty directory, hiding what is there.") var allowNonEmpty = false
  @Argument(help: "Where to mount the store.") var mountpoint: String

  func validate() throws { try checkLogLevel(logLevel) }

  func run() throws {
    let logger = bootstrapLogging(level: logLevel, label: "nixfs.mount")
    let registry = PrometheusCollectorRegistry()
    MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
    var maxBytes: UInt64? = nil
    if let maxSize {
      guard let n = parseSize(maxSize) else { fail("--max-size \(maxSize): expected a size such as 50G") }
      maxBytes = n
    }
    let store: ChunkStore
    do {
      store = try ChunkStore(.init(stateDirectory: cache.stateDir, maxStoredBytes: maxBytes))
    } catch {
      fail("\(error)")
    }
    let client: BinaryCacheClient
    do { client = try cache.client(logger: logger) } catch { fail("\(error)") }
    var options = StoreFSOptions()
    options.maxThreads = threads
    options.negativeTimeout = negativeTimeout
    options.allowNonEmpty = allowNonEmpty
    let daemon = Daemon(
      mountpoint: mountpoint, stateDir: cache.stateDir, cache: client, store: store, options: options, logger: logger)
    var metrics: MetricsEndpoint? = nil
    if let metricsListen {
      do { metrics = try MetricsEndpoint(listen: metricsListen, registry: registry) } catch { fail("\(error)") }
    }
    do {
      try daemon.run()
    } catch {
      fail("\(error)")
    }
    metrics?.stop()
  }
}

struct FetchCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "fetch",
    abstract: "Materialise store paths and their closures into the state directory now (prefetch).")

  @OptionGroup var cache: CacheOptions
  @Option(help: "Paths fetched at once.") var parallel: Int = 4
  @Argument(help: "Store paths.") var paths: [String]

  func run() async throws {
    let logger = bootstrapLogging(level: "info", label: "nixfs.fetch")
    let roots: [StorePath]
    do { roots = try paths.map { try storePathArgument($0) } } catch { fail("\(error)") }
    // A running daemon owns the store: ask it, so its lookups share the downloads.
    let socket = (cache.stateDir as NSString).appendingPathComponent("control.sock")
    if FileManager.default.fileExists(atPath: socket) {
      let client = ControlClient(path: socket)
      if (try? client.send(.ping, timeout: 5)) != nil {
        let r: ControlResponse
        do { r = try client.send(.fetch(storePaths: roots.map(\.path), parallel: parallel), timeout: 86_400) } catch {
          fail("\(error)")
        }
        if let failure = r.failure { fail("\(failure): \(r.message ?? "")") }
        print(
          "\(r.closure?.count ?? 0) paths in the closure, \(r.fetched ?? 0) fetched (through the running daemon, "
            + "with its caches and keys)")
        return
      }
    }
    let store: ChunkStore
    do { store = try ChunkStore(.init(stateDirectory: cache.stateDir)) } catch {
      let daemon = FileManager.default.fileExists(atPath: socket)
      fail(
        "\(error)"
          + (daemon
            ? " (a nixfs mount daemon seems to own it but did not answer on \(socket))"
            : " (is another nixfs process using this state directory?)"))
    }
    let client: BinaryCacheClient
    do { client = try cache.client(logger: logger) } catch { fail("\(error)") }
    let substitution = Substitution(cache: client, store: store, logger: logger)
    do {
      let r = try await substitution.fetchClosure(of: roots, parallel: parallel)
      print("\(r.paths) paths in the closure, \(r.fetched) fetched (\(r.narBytes) NAR bytes)")
    } catch {
      fail("\(error)")
    }
  }
}

/// An unknown level is an error, not a silent `info`.
func checkLogLevel(_ level: String) throws {
  guard Logger.Level(rawValue: level) != nil else {
    throw ValidationError(
      "--log-level \(level): expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
  }
}

/// Logs to stderr, one line per event with its metadata (structured, greppable).
func bootstrapLogging(level: String, label: String) -> Logger {
  let lvl = Logger.Level(rawValue: level) ?? .info
  LoggingSystem.bootstrap { label in
    var h = StreamLogHandler.standardError(label: label)
    h.logLevel = lvl
    return h
  }
  return Logger(label: label)
}
