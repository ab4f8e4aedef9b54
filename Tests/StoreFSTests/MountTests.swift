import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// Real FUSE mounts of real caches. Serialized: each test mounts its own daemon and some measure
/// page-cache residency, which parallel tests would disturb.
@Suite(.serialized) struct MountTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  func mount(_ server: CacheServer, _ tmp: TemporaryDirectory, extra: [String] = []) throws -> MountedStore {
    try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"), arguments: fx.mountArguments(server, extra: extra))
  }

  @Test(arguments: ["xz", "zstd", "none"])
  func everyPathDumpsToItsNarHash(compression: String) throws {
    let tmp = try TemporaryDirectory("fs-hash")
    let server = try CacheServer(directory: fx.caches[compression]!)
    let store = try mount(server, tmp)
    for (name, path) in fx.paths.sorted(by: { $0.key < $1.key }) {
      let nar = try NixFixture.dump(store.path(path.baseName))
      #expect(NixHash.sha256(nar) == (try fx.narInfo(path, compression: compression)).narHash, "\(name)")
    }
    // The store directory lists what this node has, not what the caches have.
    let listed = try FileManager.default.contentsOfDirectory(atPath: store.mountpoint)
    #expect(Set(listed) == Set(fx.paths.values.map(\.baseName)))
  }

  @Test func listingStartsEmptyAndUnknownPathsAreAbsent() throws {
    let tmp = try TemporaryDirectory("fs-empty")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    #expect(try FileManager.default.contentsOfDirectory(atPath: store.mountpoint).isEmpty)
    let missing = "00000000000000000000000000000000-missing"
    #expect(!FileManager.default.fileExists(atPath: store.path(missing)))
    #expect(!FileManager.default.fileExists(atPath: store.path("not-a-store-path")))
    #expect(StoreFixture.narRequests(server).isEmpty)
  }

  /// A program runs with /nix/store bound to the mount in a private mount namespace, and only the
  /// paths it touches are downloaded.
  @Test func programRunsFromTheMountAndFetchesOnlyWhatItTouches() throws {
    let tmp = try TemporaryDirectory("fs-run")
    let server = try CacheServer(directory: fx.caches["xz"]!)
    let store = try mount(server, tmp)
    try FileManager.default.createDirectory(atPath: "/nix/store", withIntermediateDirectories: true)
    let app = fx.paths["app"]!
    let result = try run([
      "unshare", "-m", "--propagation", "private", "sh", "-c",
      "mount --bind \(store.mountpoint) /nix/store && exec \(app.path)/bin/app",
    ])
    #expect(result.trimmed == "libdata")
    let fetched = Set(StoreFixture.narRequests(server))
    let expected = try Set(["app", "lib", "busybox"].map { try "/" + fx.narInfo(fx.paths[$0]!, compression: "xz").url })
    #expect(fetched == expected)
  }

  /// `nixfs fetch` on the state directory of a running daemon goes through the daemon: the
  /// closure is downloaded once, then served without another request.
  @Test func fetchThroughTheRunningDaemon() throws {
    let tmp = try TemporaryDirectory("fs-fetch")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    let app = fx.paths["app"]!
    let out = try run([nixfsBinary, "fetch", "--state-dir", store.stateDir] + fx.mountArguments(server) + [app.path]).trimmed
    #expect(out.contains("through the running daemon"), "\(out)")
    let closure = ["app", "lib", "busybox"]
    let expected = try Set(closure.map { try "/" + fx.narInfo(fx.paths[$0]!, compression: "zstd").url })
    #expect(Set(StoreFixture.narRequests(server)) == expected)
    #expect(out.hasPrefix("\(closure.count) paths in the closure, \(closure.count) fetched"), "\(out)")
    let listed = try FileManager.default.contentsOfDirectory(atPath: store.mountpoint)
    #expect(Set(listed) == Set(closure.map { fx.paths[$0]!.baseName }))
    // Again: everything is local, nothing is fetched.
    let again = try run([nixfsBinary, "fetch", "--state-dir", store.stateDir] + fx.mountArguments(server) + [app.path]).trimmed
    #expect(again.hasPrefix("3 paths in the closure, 0 fetched"), "\(again)")
    #expect(StoreFixture.narRequests(server).count == closure.count)
    // Without a daemon on its state directory, fetch opens the store itself.
    let direct = try run(
      [nixfsBinary, "fetch", "--state-dir", tmp.sub("direct-state")] + fx.mountArguments(server) + [app.path]
    ).trimmed
    #expect(direct.hasPrefix("3 paths in the closure, 3 fetched ("), "\(direct)")
    #expect(StoreFixture.narRequests(server).count == 2 * closure.count)
    // A path no cache has fails with a message naming it.
    let missing = "/nix/store/00000000000000000000000000000000-missing"
    #expect(throws: CommandError.self) {
      try run([nixfsBinary, "fetch", "--state-dir", store.stateDir] + fx.mountArguments(server) + [missing])
    }
  }

  /// With a disk budget smaller than one path, each fetch evicts the others; a path read again
  /// after its eviction (the kernel still has its entries) is fetched again, not EIO.
  @Test func evictedPathsAreFetchedAgainOnOpen() throws {
    let tmp = try TemporaryDirectory("fs-evict")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp, extra: ["--max-size", "1K"])
    let a = store.path("\(fx.paths["twin-a"]!.baseName)/share/twin-a.txt")
    let b = store.path("\(fx.paths["unrelated"]!.baseName)/data")
    let narA = try "/" + fx.narInfo(fx.paths["twin-a"]!).url
    #expect(try String(contentsOfFile: a, encoding: .utf8) == "twin-a\n")
    #expect(try Data(contentsOf: URL(fileURLWithPath: b)).count == 100_000)  // evicts twin-a
    #expect(StoreFixture.narRequests(server).filter { $0 == narA }.count == 1)
    #expect(try String(contentsOfFile: a, encoding: .utf8) == "twin-a\n")
    #expect(StoreFixture.narRequests(server).filter { $0 == narA }.count == 2)
    #expect(!store.daemon.stderr.contains("is not in the store"))
  }

  @Test func identicalFilesShareOneInodeAndTheirPages() throws {
    let tmp = try TemporaryDirectory("fs-inode")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    let a = store.path("\(fx.paths["twin-a"]!.baseName)/share/blob")
    let b = store.path("\(fx.paths["twin-b"]!.baseName)/share/blob")
    var sa = stat()
    var sb = stat()
    #expect(stat(a, &sa) == 0 && stat(b, &sb) == 0)
    #expect(sa.st_ino == sb.st_ino)
    #expect(sa.st_size == 3 << 20)
    let other = store.path("\(fx.paths["twin-a"]!.baseName)/share/twin-a.txt")
    var so = stat()
    #expect(stat(other, &so) == 0 && so.st_ino != sa.st_ino)
    // Reading one copy brings the other's pages in: they are the same pages.
    let before = try run(["fincore", "--bytes", "--noheadings", "--output", "RES", b]).trimmed
    #expect(before == "0")
    _ = try run(["cat", a])
    let after = try run(["fincore", "--bytes", "--noheadings", "--output", "RES", b]).trimmed
    #expect(after == "\(3 << 20)")
  }

  @Test func nixStoreSemantics() throws {
    let tmp = try TemporaryDirectory("fs-attrs")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    let root = store.path(fx.paths["kinds"]!.baseName)
    func st(_ p: String) -> stat {
      var s = stat()
      #expect(lstat(p, &s) == 0, "\(p)")
      return s
    }
    let dir = st(root)
    #expect(dir.st_mode == S_IFDIR | 0o555)
    #expect(dir.st_uid == 0 && dir.st_gid == 0 && dir.st_mtim.tv_sec == 1)
    let file = st("\(root)/hello.txt")
    #expect(file.st_mode == S_IFREG | 0o444 && file.st_size == 13 && file.st_mtim.tv_sec == 1)
    #expect(file.st_blocks == 1)
    let exec = st("\(root)/bin/tool")
    #expect(exec.st_mode == S_IFREG | 0o555)
    let big = st("\(root)/big.bin")
    #expect(big.st_size == (6 << 20) + 3 && big.st_blocks == Int(((6 << 20) + 3 + 511) / 512))
    let link = st("\(root)/absolute")
    #expect(link.st_mode & S_IFMT == S_IFLNK)
    #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(root)/absolute") == "/etc/hostname")
    #expect(try FileManager.default.contentsOfDirectory(atPath: "\(root)/empty-dir").isEmpty)
    // Byte-exact reads, including across a large file and at odd offsets (mmap too).
    let tree = fx.trees[fx.paths["kinds"]!]!
    #expect(FileManager.default.contents(atPath: "\(root)/big.bin") == FileManager.default.contents(atPath: "\(tree)/big.bin"))
    let mapped = try Data(contentsOf: URL(fileURLWithPath: "\(root)/random-1000"), options: .alwaysMapped)
    #expect(mapped == FileManager.default.contents(atPath: "\(tree)/random-1000"))
    // Read-only, nosuid, nodev.
    #expect(open("\(root)/hello.txt", O_WRONLY) == -1 && errno == EROFS)
    #expect(mkdir(store.path("new"), 0o755) == -1)
    var vfs = statvfs()
    #expect(statvfs(store.mountpoint, &vfs) == 0)
    // ST_RDONLY, ST_NOSUID, ST_NODEV
    #expect(vfs.f_flag & 1 != 0 && vfs.f_flag & 2 != 0 && vfs.f_flag & 4 != 0)
    #expect(vfs.f_namemax == 255)
  }

  @Test func untrustedAndTamperedPathsAreRefusedWhileGoodOnesServe() throws {
    let tmp = try TemporaryDirectory("fs-faults")
    let cache = try fx.copyCache("none", to: tmp.sub("cache"))
    // Re-sign one path with a key nobody trusts; corrupt another's NAR bytes.
    let untrusted = fx.paths["twin-a"]!
    let tampered = fx.paths["unrelated"]!
    let stranger = SecretKey(generatingWithName: "fs-test-1")
    var info = try fx.narInfo(untrusted, compression: "none")
    info.signatures = []
    info.sign(with: stranger)
    try info.serialized.write(toFile: "\(cache)/\(untrusted.hashPart).narinfo", atomically: true, encoding: .utf8)
    let bad = try fx.narInfo(tampered, compression: "none")
    var nar = try Data(contentsOf: URL(fileURLWithPath: "\(cache)/\(bad.url)"))
    nar[nar.count - 100] ^= 0xff
    try nar.write(to: URL(fileURLWithPath: "\(cache)/\(bad.url)"))

    let server = try CacheServer(directory: cache)
    let store = try mount(server, tmp)
    #expect(!FileManager.default.fileExists(atPath: store.path("\(untrusted.baseName)/share/blob")))
    errno = 0
    #expect(FileManager.default.contents(atPath: store.path("\(tampered.baseName)/data")) == nil)
    // The good path next to them is served, byte for byte.
    let good = fx.paths["twin-b"]!
    #expect(FileManager.default.contents(atPath: store.path("\(good.baseName)/share/blob")) == Data(Tree.bytes(3 << 20, seed: 99)))
    // Nothing unverified became visible.
    let listed = try FileManager.default.contentsOfDirectory(atPath: store.mountpoint)
    #expect(listed == [good.baseName])
    #expect(store.daemon.stderr.contains("no valid signature"))
    #expect(store.daemon.stderr.contains(tampered.path))
  }

  /// A stalled cache yields EIO after the stall timeout, while complete paths keep being served,
  /// offline, by a restarted daemon.
  @Test func stalledCacheAndOfflineRestart() throws {
    let tmp = try TemporaryDirectory("fs-stall")
    let kinds = fx.paths["kinds"]!
    do {
      let server = try CacheServer(directory: fx.caches["zstd"]!)
      let store = try mount(server, tmp)
      #expect(FileManager.default.fileExists(atPath: store.path("\(kinds.baseName)/hello.txt")))
      store.stop()
    }
    let stalling = try CacheServer(directory: fx.caches["zstd"]!, stall: "^/nar/")
    // Two attempts, not five: the failure comes in seconds, far inside the bound below.
    let conf = tmp.sub("nix.conf")
    try "download-attempts = 2\n".write(toFile: conf, atomically: true, encoding: .utf8)
    let store = try mount(stalling, tmp, extra: ["--stall-timeout", "2", "--connect-timeout", "2", "--nix-conf", conf])
    let start = Date()
    let content = FileManager.default.contents(atPath: store.path("\(kinds.baseName)/hello.txt"))
    #expect(content == Data("hello, world\n".utf8))
    #expect(Date().timeIntervalSince(start) < 5)
    // A path that needs the stalled cache fails cleanly instead of hanging.
    let twin = fx.paths["twin-a"]!
    let t0 = Date()
    let blocked = try run(["cat", store.path("\(twin.baseName)/share/twin-a.txt")], check: false)
    #expect(blocked.status != 0)
    #expect(blocked.stderr.contains("Input/output error"))
    #expect(Date().timeIntervalSince(t0) < 60)
    // Meanwhile the complete path is still served.
    #expect(FileManager.default.contents(atPath: store.path("\(kinds.baseName)/seven")) == Data("1234567".utf8))
  }

  /// One stalled NAR must not hold up the rest of the node: a lookup of another path and a
  /// listing of the root are answered while a reader of the stalled path still waits (the
  /// kernel serialises lookups in a directory unless the daemon takes parallel directory
  /// operations, and a lookup that waits for a download must not hold a FUSE worker).
  @Test func aStalledPathDoesNotHoldUpOtherLookups() throws {
    let tmp = try TemporaryDirectory("fs-parallel")
    let twin = fx.paths["twin-a"]!
    let kinds = fx.paths["kinds"]!
    let nar = try fx.narInfo(twin, compression: "zstd").url
    let server = try CacheServer(directory: fx.caches["zstd"]!, stall: "^/\(NSRegularExpression.escapedPattern(for: nar))$")
    let store = try mount(server, tmp, extra: ["--stall-timeout", "3600"])
    var waiting: [BackgroundProcess] = []
    // The daemon goes first: killing it aborts the FUSE connection, which frees blocked readers.
    defer {
      store.daemon.signal(SIGKILL)
      store.stop()
      for p in waiting { p.stop() }
    }
    let blocked = try BackgroundProcess(["cat", store.path("\(twin.baseName)/share/twin-a.txt")])
    waiting.append(blocked)
    let deadline = Date().addingTimeInterval(60)
    while !server.requests.contains("/" + nar) && Date() < deadline { usleep(20_000) }
    try #require(server.requests.contains("/" + nar), "the stalled NAR was never requested")
    for argv in [
      ["stat", store.path("\(kinds.baseName)/hello.txt")], ["ls", store.mountpoint],
      ["stat", store.path(fx.paths["unrelated"]!.baseName)],
    ] {
      let started = Date()
      let other = try BackgroundProcess(argv)
      waiting.append(other)
      #expect(other.wait(seconds: 30), "\(argv.joined(separator: " ")) waited behind the stalled path")
      #expect(other.process.isRunning || other.process.terminationStatus == 0, "\(argv): \(other.stderr)")
      print("\(argv[0]) answered in \(Date().timeIntervalSince(started)) s while a NAR stalled")
    }
    #expect(blocked.isRunning, "the reader of the stalled path should still be waiting")
  }

  @Test func unmountFromOutsideEndsTheDaemon() throws {
    let tmp = try TemporaryDirectory("fs-umount")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    try run(["fusermount3", "-u", store.mountpoint])
    #expect(store.daemon.wait(seconds: 10))
    #expect(store.daemon.process.terminationStatus == 0)
    #expect(!isFuseMount(store.mountpoint))
  }

  @Test func sigtermUnmountsCleanly() throws {
    let tmp = try TemporaryDirectory("fs-term")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let store = try mount(server, tmp)
    store.daemon.signal(SIGTERM)
    #expect(store.daemon.wait(seconds: 10))
    #expect(!isFuseMount(store.mountpoint))
  }

  @Test func oneDaemonPerStateDirectory() throws {
    let tmp = try TemporaryDirectory("fs-lock")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let first = try mount(server, tmp)
    let second = try run(
      [nixfsBinary, "mount", "--state-dir", first.stateDir] + fx.mountArguments(server) + [tmp.sub("mnt2")], check: false)
    #expect(second.status != 0)
    #expect(second.stderr.contains("state"))
  }
}
