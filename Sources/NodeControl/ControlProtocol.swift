import CUnix
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// Requests a local client (the CSI node plugin, the CLI) sends to the mount daemon over its
/// control socket (`<state-dir>/control.sock`, owner-only). One JSON object per line each way.
public enum ControlRequest: Codable, Sendable, Equatable {
  case ping
  /// Resolve `storePath`'s closure (narinfos only, no NAR download), pin it, and expose it as a
  /// view; idempotent for the same volume and path. `startupProfile` (default on): prefetch what
  /// pods of this path read first, and report what this one reads.
  case publish(volumeID: String, storePath: String, startupProfile: Bool? = nil)
  case unpublish(volumeID: String)
  case views
  /// Materialise the closures of `storePaths` now (prefetch); answers when done.
  case fetch(storePaths: [String], parallel: Int)
  /// `nixfs gc` on a live node: evict until the store fits `maxStoredBytes`.
  case gc(maxStoredBytes: UInt64)
  /// `nixfs fsck` on a live node (checking only: repairs need the daemon stopped).
  case fsck
  /// A successor `nixfs mount` asks for the FUSE connection (see Handover.swift). The answer
  /// carries the /dev/fuse descriptor; the daemon exits once it is sent.
  case takeover(format: Int, version: String, mountpoint: String)
  /// What the daemon is, runs with and holds (`nixfs status`).
  case status
}

/// `nixfs status`: a running daemon's account of itself.
public struct DaemonStatus: Codable, Sendable, Equatable {
  /// One setting in effect, and where its value came from: `flag`, `nix.conf`, or `default`.
  public struct Setting: Codable, Sendable, Equatable {
    public var name: String
    public var value: String
    public var source: String
    public init(name: String, value: String, source: String) {
      self.name = name
      self.value = value
      self.source = source
    }
  }
  public struct Substituter: Codable, Sendable, Equatable {
    public var url: String
    public var priority: Int
    /// `nixfs/v1` when it offers chunk indexes.
    public var chunkIndex: String?
    public init(url: String, priority: Int, chunkIndex: String?) {
      self.url = url
      self.priority = priority
      self.chunkIndex = chunkIndex
    }
  }
  public var version: String
  public var pid: Int32
  public var mountpoint: String
  public var stateDir: String
  public var settings: [Setting]
  /// Those that answered; the others are in `unreachable`.
  public var substituters: [Substituter]
  public var unreachable: [String]
  /// Published volumes (view names).
  public var views: [String]
  public var fetchesInFlight: [String]
  public var paths: Int
  public var partialPaths: Int
  public var storedBytes: UInt64
  public var budgetBytes: UInt64?
  public var chunksToFetch: Int
  public init(
    version: String, pid: Int32, mountpoint: String, stateDir: String, settings: [Setting], substituters: [Substituter],
    unreachable: [String], views: [String], fetchesInFlight: [String], paths: Int, partialPaths: Int,
    storedBytes: UInt64, budgetBytes: UInt64?, chunksToFetch: Int
  ) {
    self.version = version
    self.pid = pid
    self.mountpoint = mountpoint
    self.stateDir = stateDir
    self.settings = settings
    self.substituters = substituters
    self.unreachable = unreachable
    self.views = views
    self.fetchesInFlight = fetchesInFlight
    self.paths = paths
    self.partialPaths = partialPaths
    self.storedBytes = storedBytes
    self.budgetBytes = budgetBytes
    self.chunksToFetch = chunksToFetch
  }
}

/// Where a daemon's control socket is: in its state directory (owner-only, like the directory).
public enum ControlSocket {
  public static let fileName = "control.sock"
  public static func path(stateDir: String) -> String { (stateDir as NSString).appendingPathComponent(fileName) }
}

/// Why a request failed, in the categories a pod's owner can act on.
public enum ControlFailure: String, Codable, Sendable {
  case invalidArgument, notFound, untrusted, unavailable, alreadyExists, internalError
}

public struct ControlResponse: Codable, Sendable, Equatable {
  public var failure: ControlFailure?
  public var message: String?
  /// For `publish`: the view directory inside the mount, to bind-mount into the pod.
  public var viewPath: String?
  public var closure: [String]?
  /// For `ping`: where the store is mounted.
  public var mountpoint: String?
  public var views: [String: String]?
  /// For `fetch`: paths downloaded now (the rest of the closure was already local).
  public var fetched: Int?
  /// For `gc` and `fsck`: the report, a line each, as the command prints it.
  public var report: [String]?
  /// For `fsck`: whether the store is consistent.
  public var consistent: Bool?
  /// For `takeover`: the connection's record (its descriptor comes with the line).
  public var handover: Handover?
  /// For `status`.
  public var status: DaemonStatus?

  public init(
    failure: ControlFailure? = nil, message: String? = nil, viewPath: String? = nil, closure: [String]? = nil,
    mountpoint: String? = nil, views: [String: String]? = nil, fetched: Int? = nil, report: [String]? = nil,
    consistent: Bool? = nil, handover: Handover? = nil
  ) {
    self.handover = handover
    self.report = report
    self.consistent = consistent
    self.failure = failure
    self.message = message
    self.viewPath = viewPath
    self.closure = closure
    self.mountpoint = mountpoint
    self.views = views
    self.fetched = fetched
  }

  public init(status: DaemonStatus) { self.status = status }

  public static func failed(_ failure: ControlFailure, _ message: String) -> ControlResponse {
    ControlResponse(failure: failure, message: message)
  }
}

public struct ControlError: Error, CustomStringConvertible {
  public let socket: String
  public let reason: String
  public init(socket: String, reason: String) {
    self.socket = socket
    self.reason = reason
  }
  public var description: String { "control socket \(socket): \(reason)" }
}

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
      let client = nixfs_accept_cloexec(fd)
      if client < 0 {
        if errno == EINTR { continue }
        return  // closed
      }
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
        let box = ResultBox<Response>()
        let semaphore = DispatchSemaphore(value: 0)
        let handler = self.handler
        let received = reader.descriptor
        reader.descriptor = nil
        Task {
          box.value = await ReceivedDescriptor.$current.withValue(received) { await handler(request) }
          semaphore.signal()
        }
        semaphore.wait()
        reply = box.value ?? LineReply(.malformed("no response"))
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
        sent = writeAll(client, data)
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

final class ResultBox<Response: Encodable & Sendable>: @unchecked Sendable {
  var value: LineReply<Response>?
}

/// A client of a line server; one request at a time.
public final class LineClient<Request: Encodable & Sendable, Response: Decodable & Sendable>: @unchecked Sendable {
  public let path: String
  let lock = NSLock()

  public init(path: String) { self.path = path }

  /// Sends one request on a fresh connection (the daemon may have restarted since the last one).
  public func send(_ request: Request, timeout: Double = 300) throws -> Response {
    let (response, descriptor) = try exchange(request, timeout: timeout)
    if let descriptor { close(descriptor) }
    return response
  }

  /// Sends one request, with `descriptor` attached if given, and returns the response with the
  /// descriptor that came with it, if any (the caller owns it).
  public func exchange(_ request: Request, descriptor: Int32? = nil, timeout: Double = 30) throws -> (
    Response, Int32?
  ) {
    lock.lock()
    defer { lock.unlock() }
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
        writeAll(fd, data)
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

func unixAddress(_ path: String) throws -> sockaddr_un {
  var addr = sockaddr_un()
  addr.sun_family = sa_family_t(AF_UNIX)
  let bytes = Array(path.utf8)
  guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
    throw ControlError(socket: path, reason: "path too long for a Unix socket")
  }
  withUnsafeMutableBytes(of: &addr.sun_path) { buf in
    for (i, b) in bytes.enumerated() { buf[i] = b }
  }
  return addr
}

/// Writes all of `data`, retrying on EINTR; false on an error or a closed peer.
public func writeAll(_ fd: Int32, _ data: some ContiguousBytes) -> Bool {
  data.withUnsafeBytes { buf in
    var off = 0
    while off < buf.count {
      let n = write(fd, buf.baseAddress! + off, buf.count - off)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return false }
      off += n
    }
    return true
  }
}

struct LineReader {
  let fd: Int32
  var buffer: [UInt8] = []
  /// The first descriptor sent with the bytes (SCM_RIGHTS); the reader's owner closes it.
  var descriptor: Int32?

  init(fd: Int32) { self.fd = fd }

  mutating func next() -> [UInt8]? {
    while true {
      if let nl = buffer.firstIndex(of: 0x0a) {
        let line = Array(buffer[..<nl])
        buffer.removeFirst(nl + 1)
        return line
      }
      var chunk = [UInt8](repeating: 0, count: 65536)
      var received: Int32 = -1
      let n = nixfs_recv_with_fd(fd, &chunk, chunk.count, &received)
      if received >= 0 {
        if descriptor == nil { descriptor = received } else { close(received) }
      }
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return nil }
      buffer += chunk[0..<n]
      if buffer.count > 16 << 20 { return nil }
    }
  }
}
