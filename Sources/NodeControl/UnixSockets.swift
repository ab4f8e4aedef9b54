import CUnix
import Foundation
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

// Unix-socket plumbing shared by the line server and client: addresses, whole writes, lines.

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
      // The shim retries recvmsg on EINTR itself.
      let n = nixfs_recv_with_fd(fd, &chunk, chunk.count, &received)
      if received >= 0 {
        if descriptor == nil { descriptor = received } else { close(received) }
      }
      if n <= 0 { return nil }
      buffer += chunk[0..<n]
      if buffer.count > 16 << 20 { return nil }
    }
  }
}
