import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// The kernel's table of mounts as this process sees it (`/proc/self/mountinfo`), read without
/// touching any mount point (a FUSE mount with no daemon behind it would hang a `stat`).
public enum MountInfo {
  public struct Entry: Sendable, Equatable {
    public let mountPoint: String
    public let fileSystemType: String
  }

  public static func entries() -> [Entry] {
    let text = String(decoding: read("/proc/self/mountinfo"), as: UTF8.self)
    return text.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ")
      guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count else { return nil }
      return Entry(mountPoint: unescape(fields[4]), fileSystemType: String(fields[dash + 1]))
    }
  }

  /// A /proc file whole. Foundation's `String(contentsOfFile:)` reads what `st_size` says, and
  /// procfs says 0: it got the first 4 KiB of mountinfo only, about 40 mounts, so on any real node
  /// (hundreds of mounts) the newest were missing.
  public static func read(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return [] }
    defer { close(fd) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
      let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
      if n < 0 && errno == EINTR { continue }
      guard n > 0 else { break }
      out.append(contentsOf: buffer[0..<n])
    }
    return out
  }

  /// mountinfo escapes space, tab, newline and backslash as \\ooo.
  public static func unescape(_ field: Substring) -> String {
    guard field.contains("\\") else { return String(field) }
    var out: [UInt8] = []
    let b = Array(field.utf8)
    var i = 0
    while i < b.count {
      if b[i] == 0x5c, i + 3 < b.count, let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
        out.append(v)
        i += 4
      } else {
        out.append(b[i])
        i += 1
      }
    }
    return String(decoding: out, as: UTF8.self)
  }
}
