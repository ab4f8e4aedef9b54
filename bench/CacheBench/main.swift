import BinaryCache
import CLzma
import CZstd
import Foundation
import Logging
import NixFormats

// Binary cache client benchmarks (`make bench-cache`):
//  1. NAR download + decompress + verify throughput over loopback, for none, zstd and xz, reported
//     as MB/s of NAR per CPU-second of this process, next to the CPU cost of the bare decompressor
//     (libzstd / liblzma in a loop over the same bytes in memory) and of SHA-256 alone. When the
//     pipeline's CPU cost is close to decompressor + SHA-256, our own code is not the bottleneck.
//  2. Resolving the narinfos of a 1,000-path closure from a server that adds 20 ms to every request.
// Usage: cache-bench [corpus directories...] (default: /usr/lib/python3 /usr/share/perl)

/// Prints and flushes at once, so progress shows when the output is a pipe (make).
func say(_ text: String) {
  print(text)
  fflush(nil)
}

struct BenchError: Error, CustomStringConvertible {
  let description: String
}

@discardableResult
func sh(_ argv: [String], stdout path: String? = nil) throws -> Int32 {
  let p = Process()
  p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
  p.arguments = argv
  var env = ProcessInfo.processInfo.environment
  // The project's Nix settings (scripts/nix/nix.conf) and none of the machine's.
  let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path
  env["NIX_CONF_DIR"] = "\(repo)/scripts/nix"
  env["NIX_USER_CONF_FILES"] = ""
  env["NIX_CONFIG"] = ""
  env["NIX_REMOTE"] = ""
  p.environment = env
  if let path {
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
  }
  try p.run()
  p.waitUntilExit()
  guard p.terminationStatus == 0 else { throw BenchError(description: "\(argv.joined(separator: " ")) failed") }
  return p.terminationStatus
}

func cpuSeconds() -> Double {
  var usage = rusage()
  getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
  return Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6 + Double(usage.ru_stime.tv_sec)
    + Double(usage.ru_stime.tv_usec) / 1e6
}

func now() -> Double { Date().timeIntervalSince1970 }
func mb(_ bytes: Int, _ seconds: Double) -> String { String(format: "%7.1f", Double(bytes) / 1e6 / seconds) }

/// A static file server with optional per-request latency: Python asyncio, HTTP/1.1 keep-alive.
/// (http.server's thread per request costs ~2 ms of CPU each: with 1,000 requests on two cores it,
/// not the client, would be what the closure benchmark measures.) Killed on exit.
final class Server {
  let process = Process()
  let port: Int
  static let script = #"""
    import asyncio, os, signal, sys, threading, time
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    root, latency, parent = sys.argv[1], float(sys.argv[2]), os.getppid()
    small = {}

    def watchdog():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    async def handle(reader, writer):
        # HTTP/1.1 keep-alive, GET only; the latency is a sleep, so it costs no CPU.
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode().split("?")[0]
                if latency:
                    await asyncio.sleep(latency)
                file = os.path.join(root, path.lstrip("/"))
                data = small.get(file)
                if data is None and os.path.isfile(file):
                    with open(file, "rb") as f:
                        data = f.read()
                    if len(data) < 1 << 20:
                        small[file] = data
                if data is None:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                    writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    threading.Thread(target=watchdog, daemon=True).start()
    asyncio.run(main())
    """#

  init(root: String, latency: Double, scriptDir: String) throws {
    let script = "\(scriptDir)/server.py"
    try Self.script.write(toFile: script, atomically: true, encoding: .utf8)
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["python3", script, root, "\(latency)"]
    let out = Pipe()
    process.standardOutput = out
    try process.run()
    var line = Data()
    while !line.contains(UInt8(ascii: "\n")) {
      let piece = out.fileHandleForReading.availableData
      if piece.isEmpty { break }
      line.append(piece)
    }
    guard let p = Int(String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) else {
      throw BenchError(description: "the server did not start")
    }
    port = p
  }

  func stop() {
    if process.isRunning {
      kill(process.processIdentifier, SIGKILL)
      process.waitUntilExit()
    }
  }
}

final class CountingSink: NARSink, @unchecked Sendable {
  var count = 0
  func write(_ bytes: UnsafeRawBufferPointer) throws { count += bytes.count }
  func reset() throws { count = 0 }
}

/// The bare decompressors, in memory, with the same 256 KiB output buffer the client uses.
func rawDecompress(_ compressed: [UInt8], _ compression: String) -> Int {
  let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 16)
  defer { out.deallocate() }
  var total = 0
  compressed.withUnsafeBytes { input in
    switch compression {
    case "zstd":
      let d = ZSTD_createDStream()
      defer { ZSTD_freeDStream(d) }
      var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
      while true {
        var outBuf = ZSTD_outBuffer(dst: out.baseAddress, size: out.count, pos: 0)
        let r = ZSTD_decompressStream(d, &outBuf, &inBuf)
        total += outBuf.pos
        if ZSTD_isError(r) != 0 || (r == 0 && inBuf.pos == inBuf.size) { break }
      }
    case "xz":
      var s = nixfs_lzma_stream_init()
      _ = lzma_stream_decoder(&s, UInt64.max, nixfs_lzma_concatenated())
      defer { lzma_end(&s) }
      s.next_in = input.baseAddress!.assumingMemoryBound(to: UInt8.self)
      s.avail_in = input.count
      while true {
        s.next_out = out.baseAddress!.assumingMemoryBound(to: UInt8.self)
        s.avail_out = out.count
        let r = lzma_code(&s, LZMA_FINISH)
        total += out.count - s.avail_out
        if r != LZMA_OK { break }
      }
    default:
      total = input.count
    }
  }
  return total
}

func main() async throws {
  let corpusDirs = CommandLine.arguments.count > 1 ? Array(CommandLine.arguments.dropFirst()) : ["/usr/lib/python3", "/usr/share/perl"]
  let work = NSTemporaryDirectory() + "nixfs-cache-bench-\(getpid())"
  try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
  var servers: [Server] = []
  defer {
    for s in servers { s.stop() }
    try? FileManager.default.removeItem(atPath: work)
  }
  let key = SecretKey(generatingWithName: "bench-1")
  let quiet = Logger(label: "bench") { _ in SwiftLogNoOpLogHandler() }

  // 1. A corpus of real NARs, and a signed cache per compression.
  say("cache-bench: building the corpus from \(corpusDirs.joined(separator: " "))")
  var nars: [(StorePath, String, Int)] = []
  for (i, dir) in corpusDirs.enumerated() {
    let file = "\(work)/corpus-\(i).nar"
    try sh(["nix-store", "--dump", dir], stdout: file)
    let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
    let path = try StorePath.addedSource(narHash: NixHash.sha256(bytes), name: "corpus-\(i)")
    nars.append((path, file, bytes.count))
  }
  let narTotal = nars.map(\.2).reduce(0, +)
  say("cache-bench: \(nars.count) NARs, \(narTotal / 1_000_000) MB; compressing (zstd -19, xz -6; this takes a while)")
  let compressions: [(String, String, [String])] = [
    ("none", "nar", []), ("zstd", "nar.zst", ["zstd", "-19", "-T2", "-q", "-c"]), ("xz", "nar.xz", ["xz", "-6", "-T2", "-c"]),
  ]
  for (name, ext, cmd) in compressions {
    let dir = "\(work)/cache-\(name)"
    try FileManager.default.createDirectory(atPath: "\(dir)/nar", withIntermediateDirectories: true)
    try "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".write(toFile: "\(dir)/nix-cache-info", atomically: true, encoding: .utf8)
    for (path, file, size) in nars {
      let tmp = "\(dir)/nar/tmp"
      if cmd.isEmpty { try FileManager.default.copyItem(atPath: file, toPath: tmp) } else { try sh(cmd + [file], stdout: tmp) }
      let compressed = try Data(contentsOf: URL(fileURLWithPath: tmp))
      let fileHash = NixHash.sha256(compressed)
      let url = "nar/\(fileHash.nix32Digest).\(ext)"
      try FileManager.default.moveItem(atPath: tmp, toPath: "\(dir)/\(url)")
      var info = NarInfo(
        storePath: path, url: url, compression: NarInfo.Compression(name), fileHash: fileHash,
        fileSize: UInt64(compressed.count), narHash: NixHash.sha256(try Data(contentsOf: URL(fileURLWithPath: file))),
        narSize: UInt64(size))
      info.sign(with: key)
      try info.serialized.write(toFile: "\(dir)/\(path.hashPart).narinfo", atomically: true, encoding: .utf8)
    }
  }
  let server = try Server(root: work, latency: 0, scriptDir: work)
  servers.append(server)

  say("")
  say("NAR download + decompress + verify over loopback (MB of NAR; CPU = user+sys of this process)")
  say("compression  wall MB/s  MB/CPU-s | bare decompressor MB/CPU-s  +sha256 (Nar+File) MB/CPU-s | pipeline CPU / (decompressor+sha256)")
  let reps = 3
  for (name, _, _) in compressions {
    var config = CacheConfiguration()
    config.substituters = ["http://127.0.0.1:\(server.port)/cache-\(name)"]
    config.trustedPublicKeys = [key.publicKey.description]
    let client = try BinaryCacheClient(configuration: config, logger: quiet)
    var infos: [CachedPathInfo] = []
    for (path, _, _) in nars { infos.append(try await client.narInfo(for: path)) }
    var wall = 0.0
    var cpu = 0.0
    for _ in 0..<reps {
      for found in infos {
        let sink = CountingSink()
        let (w0, c0) = (now(), cpuSeconds())
        try await client.fetchNAR(found, into: sink)
        wall += now() - w0
        cpu += cpuSeconds() - c0
        guard sink.count == Int(found.info.narSize) else { throw BenchError(description: "short NAR") }
      }
    }
    // The bare costs, on the same bytes in memory.
    var bareCPU = 0.0
    var shaCPU = 0.0
    for _ in 0..<reps {
      for found in infos {
        let compressed = Array(try Data(contentsOf: URL(fileURLWithPath: "\(work)/cache-\(name)/\(found.info.url)")))
        let c0 = cpuSeconds()
        let n = rawDecompress(compressed, name)
        bareCPU += cpuSeconds() - c0
        guard n == Int(found.info.narSize) else { throw BenchError(description: "bare \(name) decoded \(n) bytes") }
        let nar = Array(try Data(contentsOf: URL(fileURLWithPath: nars.first { $0.0 == found.info.storePath }!.1)))
        let c1 = cpuSeconds()
        var h = NixHasher()
        h.update(nar)
        _ = h.finalize()
        // FileHash too: a second SHA-256, over the compressed bytes (skipped when they are the NAR).
        if name != "none" {
          var f = NixHasher()
          f.update(compressed)
          _ = f.finalize()
        }
        shaCPU += cpuSeconds() - c1
      }
    }
    let bytes = narTotal * reps
    say(
      "\(name.padding(toLength: 11, withPad: " ", startingAt: 0))  \(mb(bytes, wall))    \(mb(bytes, cpu))  | \(name == "none" ? "      -" : mb(bytes, bareCPU))                    \(mb(bytes, bareCPU + shaCPU))         | \(String(format: "%.2f", cpu / (bareCPU + shaCPU)))"
    )
  }

  // 2. A 1,000-path closure, 20 ms per request.
  let closureDir = "\(work)/closure"
  try FileManager.default.createDirectory(atPath: closureDir, withIntermediateDirectories: true)
  try "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".write(toFile: "\(closureDir)/nix-cache-info", atomically: true, encoding: .utf8)
  // Levels like a real system closure: wide and shallow (depth 6), each path referencing a few
  // paths of deeper levels, every path reachable from the root.
  let levelSizes = [1, 20, 80, 200, 300, 399]
  var levels: [[StorePath]] = []
  var n = 0
  for size in levelSizes {
    var level: [StorePath] = []
    for _ in 0..<size {
      level.append(try StorePath.make(type: "source", hash: NixHash.sha256(Array("pkg\(n)".utf8)), name: "pkg-\(n)"))
      n += 1
    }
    levels.append(level)
  }
  var rng = SystemRandomNumberGenerator()
  for (k, level) in levels.enumerated() {
    for (j, path) in level.enumerated() {
      var refs: Set<StorePath> = [path]
      if k + 1 < levels.count {
        let next = levels[k + 1]
        // Cover the next level, then a few random deeper references.
        var c = j
        while c < next.count {
          refs.insert(next[c])
          c += level.count
        }
        for _ in 0..<4 {
          let deeper = levels[Int.random(in: (k + 1)..<levels.count, using: &rng)]
          refs.insert(deeper[Int.random(in: 0..<deeper.count, using: &rng)])
        }
      }
      var info = NarInfo(
        storePath: path, url: "nar/\(path.hashPart).nar.zst", compression: .zstd,
        narHash: NixHash.sha256(Array(path.path.utf8)), narSize: 1000, references: Array(refs).sorted())
      info.sign(with: key)
      try info.serialized.write(toFile: "\(closureDir)/\(path.hashPart).narinfo", atomically: true, encoding: .utf8)
    }
  }
  let slow = try Server(root: closureDir, latency: 0.020, scriptDir: work)
  servers.append(slow)
  say("")
  say("closure of \(n) paths (depth \(levels.count)), 20 ms added to every request, 32 parallel lookups:")
  for run in 1...3 {
    var config = CacheConfiguration()
    config.substituters = ["http://127.0.0.1:\(slow.port)"]
    config.trustedPublicKeys = [key.publicKey.description]
    config.maxConnections = 32
    let client = try BinaryCacheClient(configuration: config, logger: quiet)
    _ = await client.substituters()  // nix-cache-info, once per daemon
    let (w0, c0) = (now(), cpuSeconds())
    let closure = try await client.closure(of: [levels[0][0]])
    let wall = now() - w0
    guard closure.count == n else { throw BenchError(description: "closure has \(closure.count) paths, not \(n)") }
    say(String(format: "  run %d: %d narinfos in %.3f s (%.3f CPU-s)", run, closure.count, wall, cpuSeconds() - c0))
  }
}

do {
  try await main()
} catch {
  FileHandle.standardError.write(Data("cache-bench: \(error)\n".utf8))
  exit(1)
}
