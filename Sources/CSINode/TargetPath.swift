import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// A CSI `target_path` checked for what kubelet sends (an absolute, normal path) and opened
/// without following symlinks: a target that is, or passes through, a symlink would bind the view
/// wherever the link points (onto `/etc`), and a relative one would land below the plugin's working
/// directory. The mount goes onto the directory we opened (`/proc/self/fd/N`), so a component
/// swapped for a symlink after the check changes nothing.
/// O_PATH (Linux, every architecture we build for): Glibc declares it only under _GNU_SOURCE.
private let oPath: Int32 = 0o10000000

struct TargetPath {
  struct Invalid: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
  }

  static let maxLength = 4096
  let path: String

  /// Checks the syntax only (for unpublish, which must not create anything).
  init(_ raw: String) throws(Invalid) {
    let shown = LogText.bounded(raw)
    guard raw.hasPrefix("/") else { throw Invalid(reason: "target_path '\(shown)' is not absolute") }
    guard raw.utf8.count <= Self.maxLength else {
      throw Invalid(reason: "target_path is \(raw.utf8.count) bytes, more than \(Self.maxLength)")
    }
    guard !raw.utf8.contains(0) else { throw Invalid(reason: "target_path '\(shown)' contains NUL") }
    let parts = raw.split(separator: "/")
    guard !parts.contains(where: { $0 == "." || $0 == ".." }), !parts.isEmpty else {
      throw Invalid(reason: "target_path '\(shown)' is not a normal path (it has '.' or '..' components, or is /)")
    }
    path = "/" + parts.joined(separator: "/")
  }

  var components: [String] { path.split(separator: "/").map(String.init) }

  /// Opens the target directory as an O_PATH descriptor, creating missing components (0750),
  /// refusing a symlink or a non-directory at any component. The caller closes it.
  func openCreatingDirectories() throws(Invalid) -> Int32 {
    var fd = open("/", oPath | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw Invalid(reason: "cannot open /: \(String(cString: strerror(errno)))") }
    var walked = ""
    for part in components {
      walked += "/" + part
      var next = openat(fd, part, oPath | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
      if next < 0 && errno == ENOENT {
        if mkdirat(fd, part, 0o750) != 0 && errno != EEXIST {
          let e = errno
          close(fd)
          throw Invalid(reason: "cannot create \(LogText.bounded(walked)): \(String(cString: strerror(e)))")
        }
        next = openat(fd, part, oPath | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
      }
      if next < 0 {
        let e = errno
        var st = stat()
        let isLink = fstatat(fd, part, &st, AT_SYMLINK_NOFOLLOW) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
        close(fd)
        if isLink || e == ELOOP {
          throw Invalid(reason: "target_path component \(LogText.bounded(walked)) is a symlink; refusing to follow it")
        }
        throw Invalid(reason: "cannot open \(LogText.bounded(walked)): \(String(cString: strerror(e)))")
      }
      close(fd)
      fd = next
    }
    return fd
  }
}
