import Foundation
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

/// Bind mounts and the kernel's view of them (`/proc/self/mountinfo`).
enum Mounts {
  struct Failure: Error, CustomStringConvertible {
    let operation: String
    let path: String
    let errno: Int32
    var description: String { "\(operation) \(path): \(String(cString: strerror(errno)))" }
  }

  /// Bind-mounts `source` at `target` read-only, nosuid, nodev. The second, remounting step is what
  /// makes a bind mount read-only on Linux; MS_REC keeps submounts visible.
  /// `shownAs` names the target in errors when `target` is a `/proc/self/fd/N` handle; the
  /// remount goes through `shownAs`, which is by then the mount point itself.
  static func bindReadOnly(_ source: String, at target: String, shownAs: String? = nil) throws {
    let name = shownAs ?? target
    if mount(source, target, nil, UInt(MS_BIND | MS_REC), nil) != 0 {
      throw Failure(operation: "bind mount \(source) at", path: name, errno: errno)
    }
    let flags = UInt(MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if mount("none", name, nil, flags, nil) != 0 {
      let e = errno
      umount2(name, Int32(MNT_DETACH) | 0x8)  // UMOUNT_NOFOLLOW
      throw Failure(operation: "remount read-only", path: name, errno: e)
    }
  }

  /// UMOUNT_NOFOLLOW: a target that is a symlink is not followed to unmount what it points at.
  static let noFollow: Int32 = 0x8

  static func unmount(_ target: String) throws {
    if umount2(target, noFollow) != 0 {
      let e = errno
      if e == EINVAL || e == ENOENT { return }  // not mounted
      // Busy (a pod still has files open): detach now, the kernel finishes when they close.
      if umount2(target, Int32(MNT_DETACH) | noFollow) != 0 && errno != EINVAL {
        throw Failure(operation: "unmount", path: target, errno: errno)
      }
    }
  }

  /// Mount points from /proc/self/mountinfo (field 5), unescaped.
  static func mountPoints() -> Set<String> { Set(MountInfo.entries().map(\.mountPoint)) }

  static func isMountPoint(_ path: String) -> Bool {
    mountPoints().contains((path as NSString).standardizingPath)
  }
}
