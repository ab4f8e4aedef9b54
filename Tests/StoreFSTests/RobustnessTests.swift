import Foundation
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

@Suite(.serialized) struct RobustnessTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// kill -9 in the middle of a fetch, restart on the same state dir: fsck is clean, the
  /// interrupted path comes out byte-identical, complete paths are served offline.
  @Test func killDuringFetchThenRestart() throws {
    let tmp = try TemporaryDirectory("fs-crash")
    let state = tmp.sub("state")
    let kinds = fx.paths["kinds"]!
    let twin = fx.paths["twin-b"]!
    let narHash = try fx.narInfo(kinds, compression: "none").narHash
    let nar = "/" + (try fx.narInfo(kinds, compression: "none").url)
    for round in 0..<3 {
      // ~6 MiB at 3 MB/s: the kill lands mid-download.
      let slow = try CacheServer(directory: fx.caches["none"]!, bandwidth: 3_000_000)
      let store = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: state, arguments: fx.mountArguments(slow))
      if round == 0 {
        #expect(FileManager.default.fileExists(atPath: store.path("\(twin.baseName)/share/twin-b.txt")))
      }
      let reader = try BackgroundProcess(["cat", store.path("\(kinds.baseName)/big.bin")])
      // Once the NAR is under way, a little later each round; and the kill must land before its end.
      let deadline = Date().addingTimeInterval(30)
      while !slow.started.contains(nar) && Date() < deadline { usleep(10_000) }
      usleep(UInt32(100_000 + round * 300_000))
      let doneBeforeKill = slow.requests.contains(nar)
      store.daemon.signal(SIGKILL)
      #expect(slow.started.contains(nar) && !doneBeforeKill, "round \(round): the kill did not land mid-download")
      #expect(store.daemon.wait(seconds: 10))
      _ = try run(["fusermount3", "-u", "-z", store.mountpoint], check: false)
      reader.stop()
      let fsck = try run([nixfsBinary, "fsck", "--state-dir", state], check: false)
      #expect(fsck.status == 0, "round \(round): \(fsck.text) \(fsck.stderr)")
    }
    // Offline: no cache at all. The complete path is served; the interrupted one is not there.
    let offline = try MountedStore(
      mountpoint: tmp.sub("mnt"), stateDir: state,
      arguments: ["--substituter", "http://127.0.0.1:9", "--trusted-public-key", fx.publicKey, "--connect-timeout", "1"])
    #expect(FileManager.default.contents(atPath: offline.path("\(twin.baseName)/share/twin-b.txt")) == Data("twin-b\n".utf8))
    offline.stop()
    let server = try CacheServer(directory: fx.caches["none"]!)
    let store = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: state, arguments: fx.mountArguments(server))
    #expect(NixHash.sha256(try NixFixture.dump(store.path(kinds.baseName))) == narHash)
  }

  /// 32 threads read random files while the paths are still being materialised: every byte is
  /// exact, nothing deadlocks, and the daemon's memory stays bounded.
  @Test func thirtyTwoReadersDuringMaterialisation() throws {
    let tmp = try TemporaryDirectory("fs-stress")
    let server = try CacheServer(directory: fx.caches["zstd"]!, bandwidth: 20_000_000)
    let store = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"), arguments: fx.mountArguments(server))
    var found: [(mounted: String, original: String)] = []
    for name in ["kinds", "twin-a", "twin-b", "unrelated"] {
      let p = fx.paths[name]!
      let tree = fx.trees[p]!
      let e = FileManager.default.enumerator(atPath: tree)!
      while let rel = e.nextObject() as? String {
        var s = stat()
        if lstat("\(tree)/\(rel)", &s) == 0 && s.st_mode & S_IFMT == S_IFREG {
          found.append((store.path("\(p.baseName)/\(rel)"), "\(tree)/\(rel)"))
        }
      }
    }
    let files = found
    let originals = files.map { FileManager.default.contents(atPath: $0.original)! }
    let mismatches = Counter()
    let reads = Counter()
    DispatchQueue.concurrentPerform(iterations: 32) { worker in
      var rng = SystemRandomNumberGenerator()
      for _ in 0..<40 {
        let i = Int.random(in: 0..<files.count, using: &rng)
        let expected = originals[i]
        guard let h = FileHandle(forReadingAtPath: files[i].mounted) else {
          mismatches.add()
          continue
        }
        let offset = expected.isEmpty ? 0 : Int.random(in: 0..<expected.count, using: &rng)
        let length = Int.random(in: 1...(256 << 10), using: &rng)
        try? h.seek(toOffset: UInt64(offset))
        let got = h.readData(ofLength: length)
        try? h.close()
        let want = expected.isEmpty ? Data() : expected.subdata(in: offset..<min(expected.count, offset + length))
        if got != want { mismatches.add() }
        reads.add()
      }
    }
    #expect(mismatches.value == 0)
    #expect(reads.value == 32 * 40)
    let status = try String(contentsOfFile: "/proc/\(store.daemon.pid)/status", encoding: .utf8)
    let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }.flatMap {
      Int($0.split(separator: " ", omittingEmptySubsequences: true)[1])
    }
    #expect((rss ?? .max) < 400_000, "daemon RSS \(rss ?? -1) kB")
  }
}

final class Counter: @unchecked Sendable {
  let lock = NSLock()
  var value = 0
  func add() { lock.withLock { value += 1 } }
}
