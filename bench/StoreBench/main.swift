import ChunkStore
import Foundation
import NixFormats

// Chunk store figures (`make bench-store`): ingest throughput from uncompressed NAR streams, cold
// random read latency, stored bytes against xz/zstd-compressed NARs, dedup of two versions.
// Usage: store-bench [work dir, default /var/tmp/nixfs-store-bench] [dir to treat as a store path]...

/// Unbuffered output, so progress shows when redirected to a file.
func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

let args = Array(CommandLine.arguments.dropFirst())
// STORE_BENCH_ONLY=ingest stops after the ingest figures (for quick profiling loops).
let onlyIngest = ProcessInfo.processInfo.environment["STORE_BENCH_ONLY"] == "ingest"
let work = args.first ?? "/var/tmp/nixfs-store-bench"
let sources =
  args.count > 1
  ? Array(args.dropFirst())
  : ["/usr/lib/gcc", "/usr/lib/python3.11", "/usr/share/man", "/usr/lib/git-core", "/usr/lib/postgresql", "/usr/share/vim"]
    .filter { FileManager.default.fileExists(atPath: $0) }

@discardableResult
func sh(_ argv: [String], stdin: String? = nil) -> [UInt8] {
  let p = Process()
  p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
  p.arguments = argv
  let out = Pipe()
  p.standardOutput = out
  p.standardError = FileHandle.nullDevice
  do { try p.run() } catch { fatalError("cannot run \(argv[0]): \(error)") }
  let data = out.fileHandleForReading.readDataToEndOfFile()
  p.waitUntilExit()
  return Array(data)
}

func mib(_ b: some BinaryInteger) -> String { String(format: "%.1f MiB", Double(b) / 1_048_576) }
func dropCaches() {
  sync()
  if let h = FileHandle(forWritingAtPath: "/proc/sys/vm/drop_caches") {
    h.write(Data("3\n".utf8))
    try? h.close()
  } else {
    say("  (cannot drop the page cache: not root; read figures are warm)")
  }
}

struct Fixture {
  let nar: [UInt8]
  let info: PathInfo
  let path: StorePath
}

func fixture(_ dir: String, name: String) -> Fixture {
  let nar = sh(["nix-store", "--dump", dir])
  let hash = NixHash.sha256(nar)
  let path = try! StorePath.addedSource(narHash: hash, name: name)
  return Fixture(nar: nar, info: PathInfo(storePath: path, narHash: hash, narSize: UInt64(nar.count)), path: path)
}

func freshStore(_ name: String, level: Int32 = 1) -> ChunkStore {
  let dir = work + "/" + name
  try? FileManager.default.removeItem(atPath: dir)
  return try! ChunkStore(.init(stateDirectory: dir, compressionLevel: level))
}

nonisolated(unsafe) var commitSeconds = 0.0

/// User plus system CPU time of the whole process (all threads), to see how busy both cores are.
func cpuSeconds() -> Double {
  var u = rusage()
  getrusage(RUSAGE_SELF.rawValue, &u)
  return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

/// Feeds 1 MiB pieces, as a download would; returns seconds from the first byte to the commit.
func ingest(_ store: ChunkStore, _ f: Fixture) -> Double {
  let t0 = Date()
  let ing = try! store.ingest(f.info)
  f.nar.withUnsafeBytes { all in
    var i = 0
    while i < all.count {
      let n = min(1 << 20, all.count - i)
      try! ing.feed(UnsafeRawBufferPointer(rebasing: all[i..<i + n]))
      i += n
    }
  }
  let t1 = Date()
  try! ing.commit()
  commitSeconds += Date().timeIntervalSince(t1)
  return Date().timeIntervalSince(t0)
}

try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
say("store-bench: \(ProcessInfo.processInfo.activeProcessorCount) cores, sources: \(sources.joined(separator: " "))")
let fixtures = sources.map { fixture($0, name: ($0 as NSString).lastPathComponent) }
let narBytes = fixtures.reduce(0) { $0 + $1.nar.count }
say("NARs: \(fixtures.count) paths, \(mib(narBytes))")

// 1. Ingest throughput (fresh store each run; includes fdatasync and the index commit).
var stats = StoreStats()
// STORE_BENCH_LEVELS=1 and STORE_BENCH_RUNS=1 narrow the ingest loop (for profiling).
let env = ProcessInfo.processInfo.environment
let levels = (env["STORE_BENCH_LEVELS"] ?? "1,3").split(separator: ",").compactMap { Int32($0) }
// Five runs per level: the machine's noise makes single runs vary by a third; the median is the figure.
let runs = Int(env["STORE_BENCH_RUNS"] ?? "") ?? 5
// With `perf record -D -1 --control fifo:PATH`, STORE_BENCH_PERF_CTL=PATH profiles only the ingests.
let perfControl = env["STORE_BENCH_PERF_CTL"].flatMap { FileHandle(forWritingAtPath: $0) }
perfControl?.write(Data("enable\n".utf8))
for level in levels {
  var rates: [Double] = []
  for run in 1...runs {
    let store = freshStore("ingest-\(level)", level: level)
    var seconds = 0.0
    commitSeconds = 0
    let cpu0 = cpuSeconds()
    for f in fixtures { seconds += ingest(store, f) }
    let cpu = cpuSeconds() - cpu0
    stats = try! store.stats()
    say(
      String(
        format: "ingest zstd-%d run %d: %.0f MB/s of NAR (%.2f s, of which commits %.2f s; CPU %.2f s), "
          + "stored %@ (compression %.2fx, dedup %.2fx)",
        level, run, Double(narBytes) / seconds / 1e6, seconds, commitSeconds, cpu, mib(stats.storedBytes),
        stats.compressionRatio, stats.dedupRatio))
    rates.append(Double(narBytes) / seconds / 1e6)
  }
  rates.sort()
  say(
    String(
      format: "ingest zstd-%d: median %.0f MB/s of NAR over %d runs (slowest %.0f, fastest %.0f)", level,
      rates[rates.count / 2], rates.count, rates.first!, rates.last!))
}

perfControl?.write(Data("disable\n".utf8))
if onlyIngest { exit(0) }

// 2. Cold random reads, on the store of the first level measured (1, the default).
let kept = work + "/ingest-\(levels[0])"
do {
  for level in levels.dropFirst() { _ = freshStore("ingest-\(level)") }  // free the disk
  let dir = kept
  var files: [(ContentID, UInt64)] = []
  do {
    let store = try! ChunkStore(.init(stateDirectory: dir))
    for f in fixtures {
      for (c, size) in try! store.tree(of: f.path)!.contents { files.append((c, size)) }
    }
  }
  // Size 0: whole small files (1 byte to 4 KiB), which are packed into shared chunks.
  for size in [4096, 131_072, 0] {
    let eligible = size == 0 ? files.filter { $0.1 > 0 && $0.1 <= 4096 } : files.filter { $0.1 >= UInt64(size) }
    dropCaches()
    // The decompressed-chunk cache off, so every read goes to the index and a pack.
    let store = try! ChunkStore(.init(stateDirectory: dir, cacheBytes: 0))
    var rng = SystemRandomNumberGenerator()
    var times: [Double] = []
    var buffer = [UInt8](repeating: 0, count: max(size, 4096))
    for _ in 0..<2000 {
      let (c, fileSize) = eligible[Int.random(in: 0..<eligible.count, using: &rng)]
      let off = size == 0 ? 0 : UInt64.random(in: 0...(fileSize - UInt64(size)), using: &rng)
      let t0 = DispatchTime.now().uptimeNanoseconds
      _ = try! buffer.withUnsafeMutableBytes { try store.read(content: c, offset: off, into: $0) }
      times.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
    }
    times.sort()
    say(
      String(
        format:
          "cold random %@ reads over %d files: p50 %.0f µs, p99 %.0f µs (2000 reads, page cache dropped first, chunk cache off)",
        size == 0 ? "whole small-file (packed, up to 4 KiB)" : "\(size / 1024) KiB", eligible.count,
        times[times.count / 2], times[times.count * 99 / 100]))
  }
}

// 3. Stored bytes against the caches' compressed NARs.
do {
  let store = try! ChunkStore(.init(stateDirectory: kept))
  let s = try! store.stats()
  let narFile = work + "/all.nar"
  var all = Data()
  for f in fixtures { all.append(contentsOf: f.nar) }
  try! all.write(to: URL(fileURLWithPath: narFile))
  var line = "stored: NAR \(mib(narBytes)), chunk store \(mib(s.storedBytes)) (index and packs on disk \(mib(s.diskBytes)))"
  for (name, argv) in [("xz -6", ["xz", "-6", "-T2", "-c"]), ("zstd -19", ["zstd", "-19", "-T2", "-c", "-q"])] {
    var total = 0
    // Each path compressed on its own, as a cache serves them.
    for (i, f) in fixtures.enumerated() {
      let one = work + "/one-\(i).nar"
      try! Data(f.nar).write(to: URL(fileURLWithPath: one))
      total += sh(argv + [one]).count
      try? FileManager.default.removeItem(atPath: one)
    }
    line += String(format: ", %@ NARs %@ (chunk store is %.2fx of it)", name, mib(total), Double(s.storedBytes) / Double(total))
  }
  try? FileManager.default.removeItem(atPath: narFile)
  say(line)
}

// 4. Two versions of a tree differing by a few percent.
do {
  let v1dir = sources.count > 1 ? sources[1] : sources[0]
  let v2dir = work + "/v2"
  try? FileManager.default.removeItem(atPath: v2dir)
  sh(["cp", "-a", v1dir, v2dir])
  sh(["chmod", "-R", "u+w", v2dir])
  var edited = 0
  var editedBytes = 0
  let walker = FileManager.default.enumerator(atPath: v2dir)!
  var index = 0
  var rng = SystemRandomNumberGenerator()
  while let rel = walker.nextObject() as? String {
    let full = v2dir + "/" + rel
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: full, isDirectory: &isDir), !isDir.boolValue,
      (try? FileManager.default.destinationOfSymbolicLink(atPath: full)) == nil,
      var bytes = FileManager.default.contents(atPath: full).map(Array.init), bytes.count > 64
    else { continue }
    index += 1
    guard index % 25 == 0 else { continue }
    // Edit 1 in 25 files: a small insertion in the middle, like a patched release.
    let at = Int.random(in: 0..<bytes.count, using: &rng)
    bytes.insert(contentsOf: Array("patched in version 2\n".utf8), at: at)
    try! Data(bytes).write(to: URL(fileURLWithPath: full))
    edited += 1
    editedBytes += bytes.count
  }
  let v1 = fixture(v1dir, name: "pkg-1")
  let v2 = fixture(v2dir, name: "pkg-2")
  let store = freshStore("versions")
  _ = ingest(store, v1)
  let one = try! store.stats()
  _ = ingest(store, v2)
  let both = try! store.stats()
  say(
    String(
      format:
        "two versions of %@ (%d files edited, %.1f%% of bytes in edited files): v1 stored %@, v1+v2 stored %@ = %.3fx of v1 (dedup %.2fx)",
      v1dir, edited, 100 * Double(editedBytes) / Double(one.logicalBytes), mib(one.storedBytes), mib(both.storedBytes),
      Double(both.storedBytes) / Double(one.storedBytes), both.dedupRatio))
  try? FileManager.default.removeItem(atPath: v2dir)
}
try? FileManager.default.removeItem(atPath: work)
