import ChunkStore
import Foundation
import Testing
import TestSupport

/// The state directory is the node's alone: an unprivileged local user can neither read the index
/// nor hold the lock (which would keep `nixfs mount`, `gc` and `fsck` from starting).
@Suite struct PermissionTests {
  static func mode(_ path: String) throws -> Int {
    (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int) ?? -1
  }

  /// `flock -n` on the lock file as user nobody; true when it got the lock.
  static func nobodyCanLock(_ file: String) throws -> Bool {
    try run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "flock", "-n", file, "true"], check: false)
      .status == 0
  }

  @Test func aNewStateDirectoryIsPrivate() throws {
    let tmp = try TemporaryDirectory("perm")
    // The parent is open to everyone, so only the state directory's own modes keep nobody out.
    chmod(tmp.path, 0o755)
    let dir = tmp.sub("state")
    do {
      let store = try openStore(dir)
      #expect(try Self.mode(dir) == 0o700)
      for file in ["lock", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        #expect(try Self.mode("\(dir)/\(file)") == 0o600, "\(file)")
      }
      #expect(try Self.mode("\(dir)/packs") == 0o700)
      _ = store
    }
    #expect(try !Self.nobodyCanLock("\(dir)/lock"))
  }

  /// A state directory an older version left readable (0755, files 0644) is tightened on open.
  @Test func anOldStateDirectoryIsTightened() throws {
    let tmp = try TemporaryDirectory("perm-old")
    chmod(tmp.path, 0o755)
    let dir = tmp.sub("state")
    do { _ = try openStore(dir) }
    chmod(dir, 0o755)
    for file in ["lock", "index.sqlite"] { chmod("\(dir)/\(file)", 0o644) }
    // The control: as it was, nobody could take the lock.
    #expect(try Self.nobodyCanLock("\(dir)/lock"))
    let store = try openStore(dir)
    #expect(try Self.mode(dir) == 0o700)
    #expect(try Self.mode("\(dir)/lock") == 0o600)
    #expect(try Self.mode("\(dir)/index.sqlite") == 0o600)
    #expect(try !Self.nobodyCanLock("\(dir)/lock"))
    _ = store
  }
}

@Suite struct ForeignStateDirectoryTests {
  /// `--state-dir /tmp` by mistake: refused, and /tmp's mode is left alone.
  @Test func aDirectoryOfOtherFilesIsNotMadePrivate() throws {
    let tmp = try TemporaryDirectory("foreign")
    chmod(tmp.path, 0o1777)
    try Tree.file(tmp.sub("someone-elses-file"), "x")
    #expect(throws: ChunkStoreError.foreignDirectory(path: tmp.path)) { _ = try openStore(tmp.path) }
    #expect(try PermissionTests.mode(tmp.path) == 0o1777)
  }
}
