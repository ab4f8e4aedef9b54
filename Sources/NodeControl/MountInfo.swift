import Foundation

/// The kernel's table of mounts as this process sees it (`/proc/self/mountinfo`), read without
/// touching any mount point (a FUSE mount with no daemon behind it would hang a `stat`).
public enum MountInfo {
  public struct Entry: Sendable, Equatable {
    public let mountPoint: String
    public let fileSystemType: String
  }

  public static func entries() -> [Entry] {
    guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
    return text.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ")
      guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count else { return nil }
      return Entry(mountPoint: unescape(fields[4]), fileSystemType: String(fields[dash + 1]))
    }
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
