import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// What an operator runs into on day two: a crashed daemon's dead mount, a mountpoint that is in
/// use, a typo in a flag, a cache to check.
@Suite(.serialized) struct OperatorTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// kill -9 leaves "Transport endpoint is not connected" at the mountpoint; the next daemon
  /// clears it and serves, instead of failing (a DaemonSet would crash-loop).
  @Test func aDeadMountIsClearedOnStart() throws {
    let tmp = try TemporaryDirectory("op-dead")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let kinds = fx.paths["kinds"]!
    do {
      // Not a MountedStore: its teardown would unmount the dead mount this test is about.
      try Tree.directory(tmp.sub("mnt"))
      let first = try BackgroundProcess(
        [nixfsBinary, "mount", "--state-dir", tmp.sub("state")] + fx.mountArguments(server) + [tmp.sub("mnt")])
      let deadline = Date().addingTimeInterval(30)
      while !isFuseMount(tmp.sub("mnt")) && first.isRunning && Date() < deadline { usleep(20_000) }
      // A read first: the kernel then holds the root's attributes, and `stat` alone would not
      // notice the mount is dead.
      #expect(FileManager.default.contents(atPath: tmp.sub("mnt/\(kinds.baseName)/hello.txt")) != nil)
      first.signal(SIGKILL)
      #expect(first.wait(seconds: 10))
      #expect(
        FileManager.default.contents(atPath: tmp.sub("mnt/\(kinds.baseName)/hello.txt")) == nil,
        "the kill should leave a dead mount")
    }
    let second = try BackgroundProcess(
      [nixfsBinary, "mount", "--state-dir", tmp.sub("state")] + fx.mountArguments(server) + [tmp.sub("mnt")])
    defer {
      second.stop()
      _ = try? run(["fusermount3", "-u", "-z", tmp.sub("mnt")], check: false)
    }
    let file = tmp.sub("mnt/\(kinds.baseName)/hello.txt")
    let deadline = Date().addingTimeInterval(30)
    var content: Data? = nil
    while content == nil && second.isRunning && Date() < deadline {
      content = FileManager.default.contents(atPath: file)
      if content == nil { usleep(50_000) }
    }
    #expect(content == Data("hello, world\n".utf8), "\(second.stderr)")
    #expect(second.stderr.contains("cleared a dead FUSE mount"))
  }

  @Test func busyOrNonEmptyMountpointsAreRefused() throws {
    let tmp = try TemporaryDirectory("op-busy")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let live = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"), arguments: fx.mountArguments(server))
    defer { live.stop() }
    let over = try run(
      [nixfsBinary, "mount", "--state-dir", tmp.sub("state2")] + fx.mountArguments(server) + [live.mountpoint], check: false)
    #expect(over.status != 0)
    #expect(over.stderr.contains("already a mount point"), "\(over.stderr)")
    #expect(FileManager.default.fileExists(atPath: live.path("\(fx.paths["kinds"]!.baseName)/hello.txt")))

    let full = tmp.sub("full")
    try Tree.file("\(full)/keep-me", "mine\n")
    let refused = try run([nixfsBinary, "mount", "--state-dir", tmp.sub("state3")] + fx.mountArguments(server) + [full], check: false)
    #expect(refused.status != 0)
    #expect(refused.stderr.contains("not empty") && refused.stderr.contains("--allow-non-empty"), "\(refused.stderr)")
    // Told to, it mounts over the directory; what was there is back after the unmount.
    let forced = try MountedStore(mountpoint: full, stateDir: tmp.sub("state3"), arguments: fx.mountArguments(server, extra: ["--allow-non-empty"]))
    #expect(!FileManager.default.fileExists(atPath: "\(full)/keep-me"))
    forced.stop()
    #expect(try String(contentsOfFile: "\(full)/keep-me", encoding: .utf8) == "mine\n")
  }

  /// A fresh node has the state volume but not the mountpoint below it: it is created.
  @Test func aMissingMountpointIsCreated() throws {
    let tmp = try TemporaryDirectory("op-fresh")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let mnt = tmp.sub("state/mnt")
    let daemon = try BackgroundProcess([nixfsBinary, "mount", "--state-dir", tmp.sub("state")] + fx.mountArguments(server) + [mnt])
    defer {
      daemon.stop()
      if isFuseMount(mnt) { _ = try? run(["fusermount3", "-u", "-z", mnt], check: false) }
    }
    let deadline = Date().addingTimeInterval(30)
    while !isFuseMount(mnt) && daemon.isRunning && Date() < deadline { usleep(20_000) }
    #expect(isFuseMount(mnt), "\(daemon.stderr)")
    #expect(daemon.stderr.contains("created the mountpoint"))
  }

  /// `nixfs gc` and `nixfs fsck` on a live node go through the daemon (which holds the lock);
  /// `--repair` says to stop it first; the mount keeps serving, fetching evicted paths again.
  @Test func gcAndFsckWhileTheDaemonRuns() throws {
    let tmp = try TemporaryDirectory("op-live")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"), arguments: fx.mountArguments(server))
    let kinds = fx.paths["kinds"]!
    #expect(FileManager.default.contents(atPath: store.path("\(kinds.baseName)/hello.txt")) == Data("hello, world\n".utf8))
    let fsck = try run([nixfsBinary, "fsck", "--state-dir", store.stateDir], check: false)
    #expect(fsck.status == 0, "\(fsck.text) \(fsck.stderr)")
    #expect(fsck.text.contains("consistent") && fsck.text.contains("through the running daemon"), "\(fsck.text)")
    let repair = try run([nixfsBinary, "fsck", "--repair", "--state-dir", store.stateDir], check: false)
    #expect(repair.status != 0 && repair.stderr.contains("stop the nixfs mount daemon"), "\(repair.stderr)")
    let gc = try run([nixfsBinary, "gc", "--max-size", "0", "--state-dir", store.stateDir], check: false)
    #expect(gc.status == 0, "\(gc.stderr)")
    #expect(gc.text.contains("evicted 1 paths") && gc.text.contains(kinds.path), "\(gc.text)")
    // Evicted, not broken: the next access fetches it again.
    let again = FileManager.default.contents(atPath: store.path("\(kinds.baseName)/seven"))
    #expect(again == Data("1234567".utf8))
  }

  @Test func anUnknownLogLevelIsAnError() throws {
    let tmp = try TemporaryDirectory("op-log")
    let r = try run([nixfsBinary, "mount", "--log-level", "verbose", "--state-dir", tmp.sub("state"), tmp.sub("mnt")], check: false)
    #expect(r.status != 0)
    #expect(r.stderr.contains("--log-level verbose: expected one of"), "\(r.stderr)")
  }

  @Test func probeChecksEverySubstituter() throws {
    let tmp = try TemporaryDirectory("op-probe")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let app = fx.paths["app"]!
    let good = try run(
      [nixfsBinary, "probe", "--state-dir", tmp.sub("state")] + fx.mountArguments(server) + [app.baseName], check: false)
    #expect(good.status == 0, "\(good.stderr)")
    #expect(good.text.contains("ok   \(server.url): nix-cache-info"))
    #expect(good.text.contains("\(app.path): signed by fs-test-1"), "\(good.text)")
    // A dead cache and a key that signed nothing: one line per problem, exit 1.
    let (_, otherKey) = try NixFixture(in: tmp.path).generateKey("other-1")
    try "download-attempts = 1\n".write(toFile: tmp.sub("one-attempt.conf"), atomically: true, encoding: .utf8)
    let bad = try run(
      [nixfsBinary, "probe", "--state-dir", tmp.sub("state2"), "--substituter", server.url, "--substituter",
       "http://127.0.0.1:9", "--connect-timeout", "1", "--trusted-public-key", otherKey, "--nix-conf", tmp.sub("one-attempt.conf"), app.path],
      check: false)
    #expect(bad.status == 1)
    let lines = bad.stderr.split(separator: "\n").filter { $0.hasPrefix("nixfs: probe: ") }
    #expect(lines.count == 2, "\(bad.stderr)")
    #expect(lines.contains { $0.contains("no valid signature") }, "\(bad.stderr)")
    #expect(lines.contains { $0.contains("127.0.0.1:9") }, "\(bad.stderr)")
  }

  /// Every command takes a store path in each of its spellings.
  @Test func fetchTakesEveryStorePathSpelling() throws {
    let tmp = try TemporaryDirectory("op-grammar")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let lib = fx.paths["lib"]!
    for (i, spelling) in [lib.path, lib.baseName, lib.path + "/lib/data"].enumerated() {
      let r = try run([nixfsBinary, "fetch", "--state-dir", tmp.sub("state\(i)")] + fx.mountArguments(server) + [spelling], check: false)
      #expect(r.status == 0, "\(spelling): \(r.stderr)")
      #expect(r.text.contains("paths in the closure"), "\(spelling): \(r.text)")
    }
  }
}
