import Foundation
import Prometheus

#if canImport(Glibc)
  import Glibc
#endif

/// A minimal HTTP endpoint answering every GET with the Prometheus text exposition.
final class MetricsEndpoint: @unchecked Sendable {
  struct Failure: Error, CustomStringConvertible {
    let address: String
    let reason: String
    var description: String { "cannot serve metrics on \(address): \(reason)" }
  }

  let fd: Int32
  let registry: PrometheusCollectorRegistry

  init(listen address: String, registry: PrometheusCollectorRegistry) throws {
    self.registry = registry
    guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...]) else {
      throw Failure(address: address, reason: "expected HOST:PORT")
    }
    var host = String(address[..<colon])
    if host.isEmpty || host == "*" { host = "0.0.0.0" }
    fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else { throw Failure(address: address, reason: "bad IPv4 address") }
    let ok = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard ok == 0, listen(fd, 16) == 0 else {
      close(fd)
      throw Failure(address: address, reason: String(cString: strerror(errno)))
    }
    let t = Thread { [self] in loop() }
    t.name = "nixfs-metrics"
    t.start()
  }

  func loop() {
    while true {
      let c = accept(fd, nil, nil)
      if c < 0 {
        if errno == EINTR { continue }
        return
      }
      var buf = [UInt8](repeating: 0, count: 4096)
      _ = read(c, &buf, buf.count)
      let body = registry.emitToBuffer()
      let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
      let out = Array(head.utf8) + body
      _ = out.withUnsafeBytes { write(c, $0.baseAddress, $0.count) }
      close(c)
    }
  }

  func stop() {
    shutdown(fd, Int32(SHUT_RDWR))
    close(fd)
  }
}
