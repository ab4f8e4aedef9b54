import CUnix
import Foundation
import SystemCalls
import Threads
#if canImport(Glibc)
  import Glibc
#endif

/// A response of a line server, with the descriptor sent with it (SCM_RIGHTS) and what to do
/// once it was sent (a takeover exits then).
public struct LineReply<Response: Encodable & Sendable>: Sendable {
  public var response: Response
  public var descriptor: Int32?
  public var afterSending: (@Sendable (_ sent: Bool) -> Void)?

  public init(_ response: Response, descriptor: Int32? = nil, afterSending: (@Sendable (_ sent: Bool) -> Void)? = nil) {
    self.response = response
    self.descriptor = descriptor
    self.afterSending = afterSending
  }
}

/// What a line server answers to a line it cannot decode.
public protocol MalformedRequestAnswer {
  static func malformed(_ reason: String) -> Self
}

extension ControlResponse: MalformedRequestAnswer {
  public static func malformed(_ reason: String) -> ControlResponse { .failed(.invalidArgument, reason) }
}

public typealias ControlReply = LineReply<ControlResponse>
public typealias ControlServer = LineServer<ControlRequest, ControlResponse>
public typealias ControlClient = LineClient<ControlRequest, ControlResponse>

/// A Unix-socket server of one JSON object per line each way (the control socket, the keeper),
/// on its own threads: handlers may wait on the network.
public final class LineServer<Request: Decodable & Sendable, Response: Encodable & Sendable & MalformedRequestAnswer>:
  @unchecked Sendable
{
  public typealias Handler = @Sendable (Request) async -> LineReply<Response>
  let path: String
  let fd: Int32
  let handler: Handler
  /// The socket file this server bound: a successor binds its own at the same path, and
  /// stopping must not remove that one.
  private var boundInode: ino_t = 0

  public init(path: String, handler: @escaping Handler) throws {
    self.path = path
    self.handler = handler
    unlink(path)
    fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw ControlError(socket: path, reason: "socket: \(String(cString: strerror(errno)))") }
    var addr = try unixAddress(path)
    let bound = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0 else {
      close(fd)
      throw ControlError(socket: path, reason: "bind: \(String(cString: strerror(errno)))")
    }
    // Owner-only: whoever can talk to the daemon can pin paths, create views, or take the mount.
    chmod(path, 0o600)
    var st = stat()
    if stat(path, &st) == 0 { boundInode = st.st_ino }
    guard listen(fd, 16) == 0 else {
      close(fd)
      throw ControlError(socket: path, reason: "listen: \(String(cString: strerror(errno)))")
    }
    let thread = Thread { [self] in acceptLoop() }
    thread.name = "nixfs-control"
    thread.start()
  }

  func acceptLoop() {
    while true {
      // Fails once the socket is closed: the server stopped.
      guard let client = try? systemCall("accept4", { nixfs_accept_cloexec(fd) }) else { return }
      let t = Thread { [self] in serve(client) }
      t.start()
    }
  }

  func serve(_ client: Int32) {
    defer { close(client) }
    var reader = LineReader(fd: client)
    while let line = reader.next() {
      // A descriptor sent with a request (the keeper's `hold`) goes to the handler's request.
      let reply: LineReply<Response>
      if let request = try? JSONDecoder().decode(Request.self, from: Data(line)) {
        let answer = Locked<LineReply<Response>?>(nil)
        let handler = self.handler
        let received = reader.descriptor
        reader.descriptor = nil
        Task {
          let r = await ReceivedDescriptor.$current.withValue(received) { await handler(request) }
          answer.withLock { $0 = r }
          answer.broadcast()
        }
        reply = answer.withLock(when: { $0 != nil }) { $0! }
      } else {
        reply = LineReply(.malformed("malformed request"))
      }
      if let d = reader.descriptor {
        close(d)
        reader.descriptor = nil
      }
      guard var data = try? JSONEncoder().encode(reply.response) else {
        reply.afterSending?(false)
        return
      }
      data.append(0x0a)
      let sent: Bool
      if let descriptor = reply.descriptor {
        sent = data.withUnsafeBytes { nixfs_send_with_fd(client, $0.baseAddress, $0.count, descriptor) == $0.count }
      } else {
        sent = (try? writeAll(client, data)) != nil
      }
      reply.afterSending?(sent)
      guard sent else { return }
    }
  }

  public func stop() {
    shutdown(fd, Int32(SHUT_RDWR))
    close(fd)
    var st = stat()
    if stat(path, &st) == 0 && st.st_ino == boundInode { unlink(path) }
  }
}

/// The descriptor that came with the request being handled (nil if none). The handler owns it.
public enum ReceivedDescriptor {
  @TaskLocal public static var current: Int32?
}

