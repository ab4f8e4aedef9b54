import Foundation
import Hummingbird
import Logging
import Prometheus
import Synchronization
import SystemCalls
import Threads

/// The mount daemon's metrics endpoint, on the HTTP stack `nixfs serve` uses: `/metrics` (and
/// any other path) answers the Prometheus text exposition, `/healthz` answers `ok`. A connection
/// idle for 30 s is closed, so a client that connects and says nothing holds up no scrape.
/// IPv4, IPv6 (`[::]:9464` listens on both, as Linux does by default) and `*:PORT`.
final class MetricsEndpoint: Sendable {
  struct Failure: Error, CustomStringConvertible {
    let address: String
    let reason: String
    var description: String { "cannot serve metrics on \(address): \(reason)" }
  }

  private let task: Task<Void, Never>

  /// Parses `HOST:PORT`, `[V6]:PORT` or `*:PORT`.
  static func parse(_ address: String) throws(Failure) -> (host: String, port: Int) {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]), (0...65535).contains(port)
    else { throw Failure(address: address, reason: "expected HOST:PORT") }
    var host = String(address[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    if host.isEmpty || host == "*" { host = "::" }
    return (host, port)
  }

  /// Binds at once: a bad or busy address throws here, before anything is mounted.
  /// `beforeScrape` runs at every scrape, to set gauges read from state (the store's size).
  init(
    listen address: String, registry: PrometheusCollectorRegistry, logger: Logger,
    beforeScrape: @escaping @Sendable () -> Void = {}
  ) throws {
    let (host, port) = try Self.parse(address)
    let router = Router()
    let metrics: @Sendable (Request, BasicRequestContext) async throws -> Response = { _, _ in
      beforeScrape()
      return Response(
        status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
    }
    router.get("healthz") { _, _ in "ok\n" }
    router.get("/", use: metrics)
    router.get("**", use: metrics)
    /// nil until the listener runs ("") or fails (why).
    let outcome = Locked<String?>(nil)
    let app = Application(
      router: router,
      server: .http1(configuration: .init(idleTimeout: .seconds(30))),
      configuration: .init(address: .hostname(host, port: port), serverName: "nixfs-metrics"),
      onServerRunning: { _ in
        outcome.withLock { $0 = $0 ?? "" }
        outcome.broadcast()
      },
      logger: logger)
    // `run`, not `runService`: the daemon handles its own signals.
    task = Task {
      do { try await app.run() } catch {
        outcome.withLock { $0 = "\(error)" }
        outcome.broadcast()
      }
    }
    let why = outcome.withLock(when: { $0 != nil }, timeout: 10) { o, _ in o }
    guard let why else {
      task.cancel()
      throw Failure(address: address, reason: "the listener did not start")
    }
    if !why.isEmpty { throw Failure(address: address, reason: why) }
  }

  /// The same from async code: the wait for the listener happens on a thread of its own, not on
  /// the concurrency pool the listener itself needs.
  static func start(listen address: String, registry: PrometheusCollectorRegistry, logger: Logger) async throws -> MetricsEndpoint {
    try await blockingWork { try MetricsEndpoint(listen: address, registry: registry, logger: logger) }
  }

  func stop() { task.cancel() }
}
