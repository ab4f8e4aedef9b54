import ChunkStore
import Foundation
import NixFormats
import TestSupport
import Testing

@Suite struct CrashTests {
  /// SIGKILLs the real `nixfs ingest` at random moments; after each kill the store must be
  /// consistent and the path either absent or complete and byte-identical.
  @Test func killedIngestLeavesNoTraceOrTheCompletePath() throws {
    guard let bin = nixfsBinary() else {
      Issue.record("nixfs binary not found next to the tests; build with --build-tests")
      return
    }
    let dir = try TemporaryDirectory("crash")
    try mixedTree(at: dir.sub("tree"), seed: 81, files: 120, big: 12 << 20)
    let f = try NARFixture(tree: dir.sub("tree"), name: "crash")
    let narFile = dir.sub("crash.nar")
    _ = FileManager.default.createFile(atPath: narFile, contents: Data(f.nar))
    let state = dir.sub("state")

    func ingestProcess(_ path: StorePath) throws -> Process {
      let p = Process()
      p.executableURL = URL(fileURLWithPath: bin)
      p.arguments = ["ingest", "--state-dir", state, "--store-path", path.path, "--nar-hash", f.hash.nix32, narFile]
      p.standardOutput = FileHandle.nullDevice
      p.standardError = FileHandle.nullDevice
      try p.run()
      return p
    }

    // How long an uninterrupted ingest takes here, to spread the kills over it.
    let t0 = Date()
    let probe = try ingestProcess(try StorePath.addedSource(narHash: f.hash, name: "probe"))
    probe.waitUntilExit()
    #expect(probe.terminationStatus == 0)
    var duration = max(Date().timeIntervalSince(t0), 0.05)
    do {
      let store = try openStore(state)
      try store.remove(try StorePath.addedSource(narHash: f.hash, name: "probe"))
    }

    var completed = 0
    var killed = 0
    var rng = SystemRandomNumberGenerator()
    for i in 0..<24 {
      let path = try StorePath.addedSource(narHash: f.hash, name: "crash-\(i)")
      let p = try ingestProcess(path)
      usleep(UInt32(Double.random(in: 0...(duration * 0.95), using: &rng) * 1_000_000))
      kill(p.processIdentifier, SIGKILL)
      p.waitUntilExit()
      if p.terminationReason == .uncaughtSignal { killed += 1 }
      let store = try openStore(state)
      let report = try store.fsck(repair: false)
      #expect(report.isConsistent, "after kill \(i): \(report.problems)")
      if store.isComplete(path) {
        completed += 1
        // Finished before the kill: aim earlier next time (the machine may be less loaded now).
        duration = max(duration * 0.8, 0.02)
        #expect(try dump(store, path) == f.nar, "after kill \(i)")
        // Start the next round from an empty store so it writes chunks again.
        try store.remove(path)
      } else {
        #expect(store.completePaths().isEmpty)
        #expect(try store.manifest(of: path) == nil)
      }
      #expect(try store.stats().paths == 0)
    }
    print("crash test: \(killed) ingests killed, \(completed) had completed before the kill")
    #expect(killed > 0)
    // The CLI agrees the store is consistent.
    #expect(try run([bin, "fsck", "--state-dir", state], check: false).status == 0)
  }
}

@Suite struct ConcurrencyTests {
  /// Readers hammer one pinned path and dump others while paths are ingested and collected:
  /// every read is byte-identical, and a path is either complete or absent, never half there.
  @Test func parallelReadersDuringIngestAndGC() throws {
    let dir = try TemporaryDirectory("concurrency")
    let shared = Tree.bytes(1 << 20, seed: 91)
    var fixtures: [NARFixture] = []
    for i in 0..<4 {
      try Tree.file(dir.sub("t\(i)/shared"), shared)
      try Tree.file(dir.sub("t\(i)/own"), Tree.bytes(600_000, seed: UInt64(92 + 2 * i)))
      try Tree.file(dir.sub("t\(i)/small"), "small file \(i)\n")
      fixtures.append(try NARFixture(tree: dir.sub("t\(i)"), name: "c\(i)"))
    }
    // A small chunk cache so reads keep going to the packs.
    let store = try openStore(dir.sub("state"), cacheBytes: 256 << 10)
    let a = fixtures[0]
    try ingest(store, a)
    store.pin(a.storePath)
    let m = try #require(try store.tree(of: a.storePath))
    guard case .regular(let sharedContent, _, _) = m.nodes[try #require(m.lookup(path: "shared"))].kind else {
      Issue.record("shared")
      return
    }

    final class Flag: @unchecked Sendable {
      let lock = NSLock()
      var stop = false
      var failures: [String] = []
      var reads = 0
      var sawComplete = 0
    }
    let flag = Flag()
    let group = DispatchGroup()
    let others = Array(fixtures.dropFirst())
    for t in 0..<3 {
      group.enter()
      Thread.detachNewThread {
        defer { group.leave() }
        var rng = SystemRandomNumberGenerator()
        while !flag.lock.withLock({ flag.stop }) {
          do {
            let off = Int.random(in: 0..<shared.count, using: &rng)
            let n = [4096, 131_072][Int.random(in: 0...1, using: &rng)]
            let got = try store.read(content: sharedContent, offset: UInt64(off), count: n)
            if got[...] != shared[off..<min(shared.count, off + n)] {
              flag.lock.withLock { flag.failures.append("thread \(t): wrong bytes at \(off)") }
            }
            if t == 0 {
              // Dump another path: complete and identical, or not there at all.
              let o = others[Int.random(in: 0..<others.count, using: &rng)]
              if store.isComplete(o.storePath) {
                do {
                  let bytes = try dump(store, o.storePath)
                  if bytes != o.nar { flag.lock.withLock { flag.failures.append("\(o.storePath): dump differs") } }
                  flag.lock.withLock { flag.sawComplete += 1 }
                } catch let e as ChunkStoreError {
                  switch e {
                  case .notComplete, .contentNotFound: break  // evicted between the check and the dump
                  default: flag.lock.withLock { flag.failures.append("\(o.storePath): \(e)") }
                  }
                }
              }
            }
            flag.lock.withLock { flag.reads += 1 }
          } catch {
            flag.lock.withLock { flag.failures.append("thread \(t): \(error)") }
          }
        }
      }
    }
    var evictions = 0
    for _ in 0..<3 {
      for o in others where !store.isComplete(o.storePath) { try ingest(store, o) }
      Thread.sleep(forTimeInterval: 0.05)
      // Evict everything but the pinned path (and one a dump has pinned for the moment); the
      // shared chunks must survive.
      let r = try store.collectGarbage(maxStoredBytes: 0)
      #expect(!r.evicted.contains(a.storePath.path))
      #expect(store.isComplete(a.storePath))
      evictions += r.evicted.count
    }
    #expect(evictions >= 3)
    flag.lock.withLock { flag.stop = true }
    group.wait()
    #expect(flag.failures.isEmpty, "\(flag.failures.prefix(5))")
    #expect(flag.reads > 0)
    #expect(try dump(store, a.storePath) == a.nar)
    #expect(try store.fsck(repair: false).isConsistent)
    #expect(try store.storedBytes() == store.stats().storedBytes)
  }
}
