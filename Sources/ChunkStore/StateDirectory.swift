import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// The node's state directory, private to its owner: 0700, created so if missing and tightened
/// if an older version (or an operator) left it readable. Anyone who can open the lock file can
/// `flock` it and keep `nixfs mount`, `gc` and `fsck` from starting; the index names every path
/// the node holds. An existing directory is tightened only if it is empty or already holds nixfs
/// state: a mistaken `--state-dir /tmp` must not make /tmp private.
func preparePrivateDirectory(
  _ path: String,
  stateMarkers: [String] = [
    "lock", "index.sqlite", "narinfo-cache.sqlite", "packs", "csi-volumes.json", "control.sock", "uploads", "mnt", "kernel-view", "backing",
  ]
) throws(ChunkStoreError) {
  var existed = true
  var prefix = path.hasPrefix("/") ? "" : "."
  for part in path.split(separator: "/") {
    prefix += "/" + part
    if mkdir(prefix, 0o700) == 0 {
      if prefix.count >= path.count { existed = false }
    } else if errno != EEXIST {
      throw .io(path: prefix, operation: "mkdir", errno: errno)
    }
  }
  if existed && !stateMarkers.isEmpty {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
    guard entries.isEmpty || entries.contains(where: stateMarkers.contains) else {
      throw .foreignDirectory(path: path)
    }
  }
  guard chmod(path, 0o700) == 0 else { throw .io(path: path, operation: "chmod 0700", errno: errno) }
}

/// Creates `path` owner-only if missing and makes an existing one owner-only (an index or lock
/// file made by an older version was 0644). Files SQLite makes beside a database (-wal, -shm)
/// take the database's mode.
func makePrivateFile(_ path: String) throws(ChunkStoreError) {
  let fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
  guard fd >= 0 else { throw .io(path: path, operation: "open", errno: errno) }
  defer { close(fd) }
  guard fchmod(fd, 0o600) == 0 else { throw .io(path: path, operation: "chmod 0600", errno: errno) }
}
