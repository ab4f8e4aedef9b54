import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// Requests a local client (the CSI node plugin, the CLI) sends to the mount daemon over its
/// control socket (`<state-dir>/control.sock`, owner-only). One JSON object per line each way.
public enum ControlRequest: Codable, Sendable, Equatable {
  case ping
  /// Resolve `storePath`'s closure (narinfos only, no NAR download), pin it, and expose it as a
  /// view; idempotent for the same volume and path.
  case publish(volumeID: String, storePath: String)
  case unpublish(volumeID: String)
  case views
  /// Materialise the closures of `storePaths` now (prefetch); answers when done.
  case fetch(storePaths: [String], parallel: Int)
  /// `nixfs gc` on a live node: evict until the store fits `maxStoredBytes`.
  case gc(maxStoredBytes: UInt64)
  /// `nixfs fsck` on a live node (checking only: repairs need the daemon stopped).
  case fsck
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

  public init(
    failure: ControlFailure? = nil, message: String? = nil, viewPath: String? = nil, closure: [String]? = nil,
    mountpoint: String? = nil, views: [String: String]? = nil, fetched: Int? = nil, report: [String]? = nil,
    consistent: Bool? = nil
  ) {
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

  public static func failed(_ failure: ControlFailure, _ message: String) -> ControlResponse {
    ControlResponse(failure: failure, message: message)
  }
}

public struct ControlError: Error, CustomStringConvertible {
  public let socket: String
  public let reason: String
  public var description: String { "control socket \(socket): \(reason)" }
}

/// Serves the control socket on its own threads: handlers may wait on the network.
public final class ControlServer: @unchecked Sendable {
  public typealias Handler = @Sendable (ControlRequest) async -> ControlResponse
  let path: String
  let fd: Int32
  let handler: Handler

  public init(path: String, handler: @escaping Handler) throws {
    self.path = path
    self.handler = handler
    unlink(path)
    fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw ControlError(socket: path, reason: "socket: \(String(cString: strerror(errno)))") }
    var addr = try unixAddress(path)
    let bound = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0 else {
      close(fd)
      throw ControlError(socket: path, reason: "bind: \(String(cString: strerror(errno)))")
    }
    // Owner-only: whoever can talk to the daemon can pin paths and create views.
    chmod(path, 0o600)
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
      let client = accept(fd, nil, nil)
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
      let response: ControlResponse
      if let request = try? JSONDecoder().decode(ControlRequest.self, from: Data(line)) {
        let box = ResultBox()
        let semaphore = DispatchSemaphore(value: 0)
        let handler = self.handler
        Task {
          box.value = await handler(request)
          semaphore.signal()
        }
        semaphore.wait()
        response = box.value ?? .failed(.internalError, "no response")
      } else {
        response = .failed(.invalidArgument, "malformed request")
      }
      guard var data = try? JSONEncoder().encode(response) else { return }
      data.append(0x0a)
      guard writeAll(client, data) else { return }
    }
  }

  public func stop() {
    shutdown(fd, Int32(SHUT_RDWR))
    close(fd)
    unlink(path)
  }
}

final class ResultBox: @unchecked Sendable {
  var value: ControlResponse?
}

/// A client of the control socket; one request at a time.
public final class ControlClient: @unchecked Sendable {
  let path: String
  let lock = NSLock()

  public init(path: String) { self.path = path }

  /// Sends one request on a fresh connection (the daemon may have restarted since the last one).
  public func send(_ request: ControlRequest, timeout: Double = 300) throws -> ControlResponse {
    lock.lock()
    defer { lock.unlock() }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw ControlError(socket: path, reason: "socket failed") }
    defer { close(fd) }
    var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
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
    guard writeAll(fd, data) else { throw ControlError(socket: path, reason: "write failed") }
    var reader = LineReader(fd: fd)
    guard let line = reader.next() else { throw ControlError(socket: path, reason: "no answer (timed out or daemon exited)") }
    return try JSONDecoder().decode(ControlResponse.self, from: Data(line))
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

func writeAll(_ fd: Int32, _ data: Data) -> Bool {
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

  init(fd: Int32) { self.fd = fd }

  mutating func next() -> [UInt8]? {
    while true {
      if let nl = buffer.firstIndex(of: 0x0a) {
        let line = Array(buffer[..<nl])
        buffer.removeFirst(nl + 1)
        return line
      }
      var chunk = [UInt8](repeating: 0, count: 65536)
      let n = read(fd, &chunk, chunk.count)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return nil }
      buffer += chunk[0..<n]
      if buffer.count > 16 << 20 { return nil }
    }
  }
}
