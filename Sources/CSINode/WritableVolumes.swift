import Crypto
import Foundation
import NixFormats
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

/// Read-write volumes (`readonly: false`): an overlayfs whose lower layers are the closure's Nix
/// state (database, /nix/var/nix) over the node's view, and whose upper and work directories are
/// the volume's own, under `<state-dir>/volumes/`. What the pod writes lands there and nowhere
/// else; unmodified files are read from the view, so their page cache is the node's one copy.
struct WritableVolume {
  /// `<state-dir>/volumes/<digest of the volume ID>`: a name no volume ID can steer elsewhere.
  let directory: String
  /// With `writableSize`: an ext4 image of that size, loop-mounted at `directory/fs`, so a full
  /// upper is ENOSPC for its own pod and nobody else's.
  let limit: UInt64?

  var image: String { directory + "/upper.img" }
  var fs: String { directory + "/fs" }
  var base: String { limit == nil ? directory : fs }
  var upper: String { base + "/upper" }
  var work: String { base + "/work" }

  static func root(stateDir: String) -> String { (stateDir as NSString).appendingPathComponent("volumes") }

  static func name(_ volumeID: String) -> String {
    SHA256.hash(data: Array(volumeID.utf8)).prefix(16).map { String(format: "%02x", $0) }.joined()
  }

  init(stateDir: String, volumeID: String, limit: UInt64?) {
    self.init(directory: (Self.root(stateDir: stateDir) as NSString).appendingPathComponent(Self.name(volumeID)), limit: limit)
  }

  init(directory: String, limit: UInt64?) {
    self.directory = directory
    self.limit = limit
  }

  struct Failure: Error, CustomStringConvertible {
    let description: String
  }

  /// The upper and work directories, made empty (a retry after a failed publish starts over).
  func create() throws {
    remove()
    do {
      try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
      if let limit {
        let fd = open(image, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Failure(description: "create \(image): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(limit)) == 0 else {
          throw Failure(description: "size \(image) to \(limit) bytes: \(String(cString: strerror(errno)))")
        }
        try Self.run("/sbin/mkfs.ext4", ["-q", "-F", "-m", "0", "-E", "root_owner=0:0,nodiscard", image])
        try FileManager.default.createDirectory(atPath: fs, withIntermediateDirectories: true)
        try Self.run("/bin/mount", ["-o", "loop,nosuid,nodev", image, fs])
      }
      try FileManager.default.createDirectory(atPath: upper, withIntermediateDirectories: true)
      try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
    } catch {
      remove()
      throw error
    }
  }

  /// Unmounts the size-limited file system, if any, and removes everything of the volume.
  func remove() {
    if Mounts.isMountPoint(fs) { try? Mounts.unmount(fs) }
    try? FileManager.default.removeItem(atPath: directory)
  }

  /// Bytes the pod wrote (the upper's blocks), for `nixfs status`.
  static func usedBytes(_ directory: String) -> UInt64 {
    var total: UInt64 = 0
    guard let walker = FileManager.default.enumerator(atPath: directory) else { return 0 }
    while let relative = walker.nextObject() as? String {
      var st = stat()
      if lstat((directory as NSString).appendingPathComponent(relative), &st) == 0, (st.st_mode & S_IFMT) != S_IFDIR {
        total += UInt64(st.st_blocks) * 512
      }
    }
    return total
  }

  /// `writableSize`: a Kubernetes quantity (`2Gi`, `500M`, `1073741824`); at least 16 MiB, where
  /// ext4 has room for more than its own metadata.
  static func parseSize(_ text: String) -> UInt64? {
    let units: [(String, UInt64)] = [
      ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("k", 1000), ("K", 1000), ("M", 1_000_000),
      ("G", 1_000_000_000), ("T", 1_000_000_000_000),
    ]
    var number = Substring(text)
    var scale: UInt64 = 1
    for (suffix, factor) in units where text.hasSuffix(suffix) {
      number = text.dropLast(suffix.count)
      scale = factor
      break
    }
    guard !number.isEmpty, number.allSatisfy(\.isASCII), let n = UInt64(number) else { return nil }
    let (bytes, overflow) = n.multipliedReportingOverflow(by: scale)
    guard !overflow, bytes >= 16 << 20 else { return nil }
    return bytes
  }

  static func run(_ tool: String, _ arguments: [String]) throws {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: tool)
    p.arguments = arguments
    let err = Pipe()
    p.standardError = err
    p.standardOutput = FileHandle.nullDevice
    do { try p.run() } catch { throw Failure(description: "cannot run \(tool): \(error)") }
    let message = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
      let text = String(decoding: message, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
      throw Failure(description: "\((tool as NSString).lastPathComponent) \(arguments.joined(separator: " ")): \(text)")
    }
  }
}

/// The read-write volumes published from `stateDir`, from the plugin's records, with what each
/// pod wrote so far (`nixfs status`).
public func readWriteVolumes(stateDir: String) -> [DaemonStatus.ReadWriteVolume] {
  VolumeRecords(stateDir: stateDir).all.filter { !$0.isReadOnly }.sorted { $0.volumeID < $1.volumeID }.map { r in
    let limit = r.attributes["writableSize"].flatMap(WritableVolume.parseSize)
    let volume = WritableVolume(stateDir: stateDir, volumeID: r.volumeID, limit: limit)
    return .init(volumeID: r.volumeID, target: r.targetPath, writtenBytes: WritableVolume.usedBytes(volume.upper), limitBytes: limit)
  }
}

extension Mounts {
  /// An overlayfs at `target`: `lowers` top first, `upper` and `work` on one file system. Index,
  /// metacopy, redirect_dir and xino off: none of them is needed, and each would want file handles
  /// of the FUSE lower or change what a pod sees. `shownAs` as for `bindReadOnly`.
  static func overlay(lowers: [String], upper: String, work: String, at target: String, shownAs: String? = nil) throws {
    for dir in lowers + [upper, work] where dir.contains(where: { $0 == ":" || $0 == "," || $0 == "\\" }) {
      throw Failure(operation: "overlay: a layer's path has ':', ',' or '\\\\' in it:", path: dir, errno: EINVAL)
    }
    let options =
      "lowerdir=\(lowers.joined(separator: ":")),upperdir=\(upper),workdir=\(work),index=off,metacopy=off,redirect_dir=off,xino=off"
    if mount("overlay", target, "overlay", UInt(MS_NOSUID | MS_NODEV), options) != 0 {
      throw Failure(operation: "mount an overlay (\(options)) at", path: shownAs ?? target, errno: errno)
    }
  }
}
