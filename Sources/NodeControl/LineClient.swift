import CUnix
import Foundation
import SystemCalls
import Synchronization
import Threads
#if canImport(Glibc)
  import Glibc
#endif

/// A client of a line server; one request at a time.
public final class LineClient<Request: Encodable & Sendable, Response: Decodable & Sendable>: Sendable {
  public let path: String
  /// One exchange at a time per client.
  private let serial = Mutex<Void>(())

  public init(path: String) { self.path = path }

  /// Sends one request on a fresh connection (the daemon may have restarted since the last one).
  public func send(_ request: Request, timeout: Double = 300) throws -> Response {
    let (response, descriptor) = try exchange(request, timeout: timeout)
    if let descriptor { close(descriptor) }
    return response
  }

  /// `send` from async code: the exchange waits on the blocking pool, not on a concurrency thread.
  public func request(_ request: Request, timeout: Double = 300) async throws -> Response {
    try await blockingWork { try self.send(request, timeout: timeout) }
  }

  /// Sends one request, with `descriptor` attached if given, and returns the response with the
  /// descriptor that came with it, if any (the caller owns it).
  public func exchange(_ request: Request, descriptor: Int32? = nil, timeout: Double = 30) throws -> (
    Response, Int32?
  ) {
    try serial.withLock { _ in try exchangeAlone(request, descriptor: descriptor, timeout: timeout) }
  }

  private func exchangeAlone(_ request: Request, descriptor: Int32?, timeout: Double) throws -> (Response, Int32?) {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw ControlError(socket: path, reason: "socket failed") }
    defer { close(fd) }
    var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - timeout.rounded(.down)) * 1e6))
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var addr = try unixAddress(path)
    let connected = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard connected == 0 else {
      let e = errno
      if e == EACCES || e == EPERM {
        // The socket is the daemon owner's alone (0600, in a 0700 state directory).
        throw ControlError(socket: path, reason: "permission denied: only the daemon's user (root) may use it")
      }
      throw ControlError(socket: path, reason: "cannot connect (is `nixfs mount` running?): \(String(cString: strerror(e)))")
    }
    var data = try JSONEncoder().encode(request)
    data.append(0x0a)
    let written =
      if let descriptor {
        data.withUnsafeBytes { nixfs_send_with_fd(fd, $0.baseAddress, $0.count, descriptor) == $0.count }
      } else {
        (try? writeAll(fd, data)) != nil
      }
    guard written else { throw ControlError(socket: path, reason: "write failed") }
    var reader = LineReader(fd: fd)
    guard let line = reader.next() else {
      if let d = reader.descriptor { close(d) }
      throw ControlError(socket: path, reason: "no answer (timed out or daemon exited)")
    }
    do {
      return (try JSONDecoder().decode(Response.self, from: Data(line)), reader.descriptor)
    } catch {
      if let d = reader.descriptor { close(d) }
      throw ControlError(socket: path, reason: "malformed answer: \(error)")
    }
  }
}
