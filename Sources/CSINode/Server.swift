import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NodeControl

/// Serves the CSI Identity and Node services on a Unix socket until SIGTERM/SIGINT.
public enum CSIServer {
  public static func run(config: CSIConfiguration, endpoint: String, logger: Logger) async throws {
    let path = endpoint.hasPrefix("unix://") ? String(endpoint.dropFirst("unix://".count)) : endpoint
    try? FileManager.default.createDirectory(
      atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    unlink(path)
    let node = NodeService(config: config, logger: logger)
    node.reconcile()
    let server = GRPCServer(
      transport: .http2NIOPosix(address: .unixDomainSocket(path: path), transportSecurity: .plaintext),
      services: [IdentityService(config: config), node])
    TerminationSignals.onTermination { server.beginGracefulShutdown() }
    logger.info("serving CSI", metadata: ["endpoint": "\(endpoint)", "driver": "\(config.driverName)", "node": "\(config.nodeID)"])
    try await server.serve()
    unlink(path)
    logger.info("stopped")
  }
}
