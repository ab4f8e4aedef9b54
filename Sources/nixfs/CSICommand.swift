import ArgumentParser
import CSINode
import CoreMetrics
import Foundation
import Prometheus

struct CSICommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "csi",
    abstract: "Serve the CSI Identity and Node services, publishing views of the node's nixfs mount into pods.",
    discussion: """
      Talks to `nixfs mount` of the same state directory over its control socket. Restarting it \
      does not disturb running pods: published volumes are recorded and reconciled on start.
      """)

  @Option(help: "The state directory shared with `nixfs mount`.") var stateDir: String = "/var/lib/nixfs"
  @Option(help: "The CSI endpoint kubelet talks to.") var endpoint: String = "unix:///csi/csi.sock"
  @Option(help: "This node's ID (default: $NODE_NAME).") var nodeID: String?
  @Option(help: "The CSI driver name; nix.csi.store replaces nix-csi without touching pod specs.")
  var driverName: String = CSIConfiguration.defaultDriverName
  @Option(help: "The Nix system whose volume attribute names the store path (default: detected).")
  var system: String?
  @Option(help: "A nix binary, to evaluate flakeRef and nixExpr volume attributes.") var nix: String?
  @Option(help: "Seconds one evaluation of a flakeRef or nixExpr may take (then DeadlineExceeded).")
  var evaluationTimeout: Double = 120
  @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
  @Option(help: "Log lines as text, or as one JSON object each (json).") var logFormat: LogFormat = .text
  @Option(help: "Serve Prometheus metrics (publish outcomes and latency) on ADDR:PORT, e.g. 0.0.0.0:9465.")
  var metricsListen: String?

  func validate() throws {
    try checkLogLevel(logLevel)
    if let metricsListen {
      do { _ = try MetricsEndpoint.parse(metricsListen) } catch { throw ValidationError("\(error)") }
    }
    guard evaluationTimeout > 0 else { throw ValidationError("--evaluation-timeout \(evaluationTimeout): expected a positive number of seconds") }
  }

  func run() async throws {
    let logger = bootstrapLogging(level: logLevel, label: "nixfs.csi", format: logFormat)
    guard let node = nodeID ?? ProcessInfo.processInfo.environment["NODE_NAME"], !node.isEmpty else {
      fail("no node ID: pass --node-id or set NODE_NAME")
    }
    var config = CSIConfiguration(
      driverName: driverName, nodeID: node, stateDir: stateDir, system: system ?? CSIConfiguration.detectSystem(),
      nixBinary: nix)
    config.evaluationTimeout = evaluationTimeout
    let registry = PrometheusCollectorRegistry()
    MetricsSystem.bootstrap(DescribedMetricsFactory(registry: registry, help: CSIMetrics.help))
    var metricsServer: MetricsEndpoint? = nil
    if let metricsListen {
      do { metricsServer = try await MetricsEndpoint.start(listen: metricsListen, registry: registry, logger: logger) } catch {
        fail("\(error)")
      }
    }
    defer { metricsServer?.stop() }
    do {
      try await CSIServer.run(config: config, endpoint: endpoint, logger: logger)
    } catch {
      fail("\(error)")
    }
  }
}
