import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import ServiceLifecycle

/// Serves the CSI Identity and Node services on a Unix socket until SIGTERM, SIGINT or SIGHUP.
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
    logger.info("serving CSI", metadata: ["endpoint": "\(endpoint)", "driver": "\(config.driverName)", "node": "\(config.nodeID)"])
    // swift-service-lifecycle turns SIGTERM (kubelet stopping the pod), SIGINT and SIGHUP into a graceful
    // shutdown: calls in flight finish, new ones are refused.
    let group = ServiceGroup(
      services: [GracefulGRPCServer(server: server)], gracefulShutdownSignals: [.sigterm, .sigint, .sighup], logger: logger)
    try await group.run()
    unlink(path)
    logger.info("stopped")
  }
}

/// A gRPC server as a service of a `ServiceGroup` (what grpc-swift-extras' GRPCServiceLifecycle
/// provides; that package is not among the ones available here).
struct GracefulGRPCServer: Service {
  let server: GRPCServer<HTTP2ServerTransport.Posix>

  func run() async throws {
    try await withGracefulShutdownHandler {
      try await server.serve()
    } onGracefulShutdown: {
      server.beginGracefulShutdown()
    }
  }
}
