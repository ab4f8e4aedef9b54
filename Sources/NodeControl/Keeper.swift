import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// `nixfs keeper`: a small process beside the daemon that holds a duplicate of the FUSE
/// connection's descriptor with its handover record. The kernel keeps a connection alive while
/// any process holds its descriptor, so when the daemon crashes (or is killed, or its container
/// restarts) pods' requests wait in the kernel instead of failing with ENOTCONN, and the next
/// daemon asks the keeper for the connection. The keeper never reads from it.
public enum KeeperRequest: Codable, Sendable {
  /// Hold this connection (its descriptor comes with the line), replacing any other.
  case hold(Handover)
  /// Hand the held connection over (with its descriptor), if it is still alive.
  case give
  /// Stop holding `connection` (the daemon unmounted it on purpose).
  case release(connection: String)
}

public struct KeeperResponse: Codable, Sendable, MalformedRequestAnswer {
  public var ok: Bool
  public var reason: String?
  public var handover: Handover?

  public init(ok: Bool, reason: String? = nil, handover: Handover? = nil) {
    self.ok = ok
    self.reason = reason
    self.handover = handover
  }

  public static func malformed(_ reason: String) -> KeeperResponse { KeeperResponse(ok: false, reason: reason) }
}

public final class Keeper: Sendable {
  struct Held {
    let handover: Handover
    let fd: Int32
  }

  let held = Mutex<Held?>(nil)
  let logger: Logger

  public init(logger: Logger) { self.logger = logger }

  /// True while the kernel still has the connection (a poll for nothing reports only errors).
  static func alive(_ fd: Int32) -> Bool {
    var p = pollfd(fd: fd, events: 0, revents: 0)
    return poll(&p, 1, 0) >= 0 && p.revents & Int16(POLLERR | POLLHUP | POLLNVAL) == 0
  }

  public func handle(_ request: KeeperRequest, descriptor: Int32?) -> LineReply<KeeperResponse> {
    switch request {
    case .hold(let handover):
      guard let descriptor else { return LineReply(KeeperResponse(ok: false, reason: "no descriptor came with hold")) }
      let previous = held.withLock { h -> Held? in
        let old = h
        h = Held(handover: handover, fd: descriptor)
        return old
      }
      if let previous { close(previous.fd) }
      if previous?.handover.connection != handover.connection {
        logger.info("holding the FUSE connection", metadata: ["connection": "\(handover.connection)"])
      }
      return LineReply(KeeperResponse(ok: true))
    case .give:
      let h = held.withLock { h -> Held? in
        if let current = h, !Self.alive(current.fd) {
          close(current.fd)
          h = nil
        }
        return h
      }
      guard let h else { return LineReply(KeeperResponse(ok: false, reason: "no live connection held")) }
      logger.info("handing the FUSE connection to a new daemon", metadata: ["connection": "\(h.handover.connection)"])
      return LineReply(KeeperResponse(ok: true, handover: h.handover), descriptor: h.fd)
    case .release(let connection):
      let released = held.withLock { h -> Held? in
        guard let current = h, current.handover.connection == connection else { return nil }
        h = nil
        return current
      }
      if let released {
        close(released.fd)
        logger.info("released the FUSE connection", metadata: ["connection": "\(connection)"])
      }
      return LineReply(KeeperResponse(ok: true))
    }
  }

  /// Serves `socketPath` until the process ends.
  public func serve(socketPath: String) throws -> LineServer<KeeperRequest, KeeperResponse> {
    try LineServer<KeeperRequest, KeeperResponse>(path: socketPath) { [self] request in
      handle(request, descriptor: ReceivedDescriptor.current)
    }
  }
}

public typealias KeeperClient = LineClient<KeeperRequest, KeeperResponse>
