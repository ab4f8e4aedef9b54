import Foundation
import StoreFS
import Logging
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

/// What `nixfs mount` checks and clears at its mountpoint before mounting, as rclone and fuse do:
/// a missing mountpoint is created; a crashed daemon's dead FUSE mount is cleared (otherwise every restart fails with "Transport
/// endpoint is not connected" and a DaemonSet crash-loops until someone unmounts by hand); a live
/// mount or a non-empty directory is refused unless `allowNonEmpty`, so nothing is hidden by
/// accident.
public enum Mountpoint {
  static func prepare(_ path: String, allowNonEmpty: Bool, logger: Logger) throws(MountError) {
    func refuse(_ reason: String) -> MountError { MountError(mountpoint: path, reason: reason) }
    var st = stat()
    if stat(path, &st) != 0 && errno == ENOENT {
      // A fresh node has the state directory's volume but not the mountpoint below it.
      do {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
      } catch {
        throw refuse("it does not exist and cannot be created: \(error.localizedDescription)")
      }
      logger.info("created the mountpoint", metadata: ["mountpoint": "\(path)"])
    }
    if let e = deadMountError(path, &st) {
      guard e == ENOTCONN || e == ECONNABORTED else { throw refuse(String(cString: strerror(e))) }
      // The FUSE server behind it is gone; only the kernel's mount entry is left. A lazy unmount
      // cannot hurt a reader: every access there already fails.
      guard umount2(path, Int32(MNT_DETACH)) == 0 else {
        throw refuse("a dead FUSE mount is left there and cannot be cleared: \(String(cString: strerror(errno)))")
      }
      logger.warning("cleared a dead FUSE mount left by a crashed daemon", metadata: ["mountpoint": "\(path)"])
      guard stat(path, &st) == 0 else { throw refuse(String(cString: strerror(errno))) }
    }
    guard (st.st_mode & S_IFMT) == S_IFDIR else { throw refuse("it is not a directory") }
    if allowNonEmpty { return }
    var parent = stat()
    let parentPath = (path as NSString).deletingLastPathComponent
    if path != "/", stat(parentPath.isEmpty ? "." : parentPath, &parent) == 0, parent.st_dev != st.st_dev {
      throw refuse("it is already a mount point (another nixfs?); unmount it, or pass --allow-non-empty to mount over it")
    }
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
    if !entries.isEmpty {
      throw refuse(
        "the directory is not empty (\(entries.count) entries, e.g. '\(entries.sorted()[0])'); pass --allow-non-empty to mount over it")
    }
  }

  /// The error of `stat`, or else of opening the directory: a dead FUSE mount may still answer
  /// `stat` from the kernel's attribute cache (the store's attributes never expire), but opening
  /// its root always asks the daemon.
  static func deadMountError(_ path: String, _ st: inout stat) -> Int32? {
    if stat(path, &st) != 0 { return errno }
    guard (st.st_mode & S_IFMT) == S_IFDIR else { return nil }
    let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd < 0 { return errno == ENOTCONN || errno == ECONNABORTED ? errno : nil }
    close(fd)
    return nil
  }

  /// Whether a nixfs FUSE mount is at `path` (from the mount table: never touching the path).
  public static func hasNixFSMount(at path: String) -> Bool {
    let target = (path as NSString).standardizingPath
    return MountInfo.entries().contains { $0.mountPoint == target && $0.fileSystemType == "fuse.nixfs" }
  }
}
