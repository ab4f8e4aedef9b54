import Foundation
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

/// The repository root, for scripts the tests run.
public let repositoryRoot: String = {
  var url = URL(fileURLWithPath: #filePath)
  for _ in 0..<3 { url.deleteLastPathComponent() }
  return url.path
}()

/// The `nixfs` executable built next to the test bundle (`swift build --build-tests` builds it).
public let nixfsBinary: String = {
  let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
  for candidate in [dir, dir.deletingLastPathComponent()] {
    let p = candidate.appendingPathComponent("nixfs").path
    if FileManager.default.isExecutableFile(atPath: p) { return p }
  }
  return dir.appendingPathComponent("nixfs").path
}()

/// A process that runs while a test needs it and is always stopped (TERM, then KILL) when the
/// value is released, failing test or not. Its stdout is readable line by line; stderr goes to a
/// file kept for failure messages.
public final class BackgroundProcess: @unchecked Sendable {
  public let process = Process()
  public let argv: [String]
  let out = Pipe()
  let errPath: String
  var buffer = Data()

  public init(_ argv: [String], environment: [String: String] = [:]) throws {
    self.argv = argv
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = argv
    var env = ProcessInfo.processInfo.environment
    env.merge(environment) { $1 }
    process.environment = env
    process.standardOutput = out
    process.standardInput = FileHandle.nullDevice
    errPath = NSTemporaryDirectory() + "nixfs-bg-\(UUID().uuidString.prefix(8)).stderr"
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    try process.run()
  }

  public var pid: Int32 { process.processIdentifier }
  public var isRunning: Bool { process.isRunning }

  /// What it wrote to stderr so far.
  public var stderr: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

  /// The next stdout line, or nil at end of output.
  public func readLine() -> String? {
    while true {
      if let nl = buffer.firstIndex(of: 0x0a) {
        let line = String(decoding: buffer[buffer.startIndex..<nl], as: UTF8.self)
        buffer.removeSubrange(buffer.startIndex...nl)
        return line
      }
      let chunk = out.fileHandleForReading.availableData
      if chunk.isEmpty { return nil }
      buffer.append(chunk)
    }
  }

  public func signal(_ sig: Int32) { if process.isRunning { kill(process.processIdentifier, sig) } }

  /// Waits up to `seconds` for exit; true when it exited.
  @discardableResult
  public func wait(seconds: Double) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while process.isRunning && Date() < deadline { usleep(20_000) }
    return !process.isRunning
  }

  public func stop() {
    signal(SIGTERM)
    if !wait(seconds: 10) {
      signal(SIGKILL)
      wait(seconds: 10)
    }
  }

  deinit {
    stop()
    try? FileManager.default.removeItem(atPath: errPath)
  }
}

/// `scripts/cache-server.py` serving a binary cache directory on 127.0.0.1.
public final class CacheServer: @unchecked Sendable {
  public let process: BackgroundProcess
  public let port: Int
  public let logFile: String
  public var url: String { "http://127.0.0.1:\(port)" }

  /// Serves `directory`, or (with `upstream`) proxies to another cache. `stall`, `fail`,
  /// `corrupt` and `truncate` are regexes of request paths that get that fault.
  public init(
    directory: String = "/nonexistent", upstream: String? = nil, latencyMs: Double = 0, bandwidth: Double = 0,
    stall: String? = nil, fail: String? = nil, corrupt: String? = nil, truncate: String? = nil
  ) throws {
    logFile = NSTemporaryDirectory() + "nixfs-cache-\(UUID().uuidString.prefix(8)).log"
    var argv = ["python3", "\(repositoryRoot)/scripts/cache-server.py", "--dir", directory, "--log", logFile]
    if let upstream { argv += ["--upstream", upstream] }
    if let corrupt { argv += ["--corrupt", corrupt] }
    if let truncate { argv += ["--truncate", truncate] }
    if latencyMs > 0 { argv += ["--latency-ms", "\(latencyMs)"] }
    if bandwidth > 0 { argv += ["--bandwidth", "\(bandwidth)"] }
    if let stall { argv += ["--stall", stall] }
    if let fail { argv += ["--fail", fail] }
    process = try BackgroundProcess(argv)
    guard let line = process.readLine(), line.hasPrefix("PORT "), let p = Int(line.dropFirst(5)) else {
      throw CommandError(argv: argv, status: -1, stderr: process.stderr)
    }
    port = p
  }

  /// Paths requested so far, in order (each once its answer was sent).
  public var requests: [String] { logged("done") }

  /// Paths whose body the server has started to send.
  public var started: [String] { logged("start") }

  private func logged(_ event: String) -> [String] {
    guard let text = try? String(contentsOfFile: logFile, encoding: .utf8) else { return [] }
    return text.split(separator: "\n").compactMap { line in
      guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
        (obj["event"] as? String ?? "done") == event
      else { return nil }
      return obj["path"] as? String
    }
  }

  deinit {
    process.stop()
    try? FileManager.default.removeItem(atPath: logFile)
  }
}

/// `scripts/s3-server.py`: an S3-compatible server (moto's) on 127.0.0.1 that checks SigV4
/// signatures, holding a binary cache directory in a bucket.
public final class S3Server: @unchecked Sendable {
  public let process: BackgroundProcess
  public let port: Int
  public let accessKeyID: String
  public let secretAccessKey: String
  public let bucket: String
  public let region: String

  public init(directory: String, bucket: String = "nix-cache", region: String = "eu-west-1") throws {
    let argv = ["python3", "\(repositoryRoot)/scripts/s3-server.py", "--dir", directory, "--bucket", bucket, "--region", region]
    process = try BackgroundProcess(argv)
    guard let portLine = process.readLine(), portLine.hasPrefix("PORT "), let p = Int(portLine.dropFirst(5)),
      let keyLine = process.readLine(), keyLine.hasPrefix("KEY ")
    else { throw CommandError(argv: argv, status: -1, stderr: process.stderr) }
    let key = keyLine.split(separator: " ")
    port = p
    accessKeyID = String(key[1])
    secretAccessKey = String(key[2])
    self.bucket = bucket
    self.region = region
  }

  /// The substituter, as Nix spells it.
  public func url(extra: String = "") -> String {
    "s3://\(bucket)?region=\(region)&endpoint=127.0.0.1:\(port)&scheme=http\(extra)"
  }

  deinit { process.stop() }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
public func freePort() throws -> Int {
  let out = try run(["python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"])
  guard let port = Int(out.trimmed) else { throw CommandError(argv: ["python3", "free port"], status: -1, stderr: out.text) }
  return port
}

/// The body of a GET (10 s timeout); throws on anything but a 2xx.
public func httpBody(_ url: String) throws -> String {
  try run(["python3", "-c", "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", url]).text
}

/// True when `path` is a FUSE mount point (from /proc/self/mountinfo).
public func isFuseMount(_ path: String) -> Bool {
  let text = String(decoding: readProcFile("/proc/self/mountinfo"), as: UTF8.self)
  return text.split(separator: "\n").contains { line in
    let f = line.split(separator: " ")
    return f.count > 4 && f[4] == path && line.contains(" - fuse")
  }
}

/// True when something accepts connections on the Unix socket at `path` (a socket file alone
/// may be a stale one, or bound but not yet listening).
public func acceptsConnections(unixSocket path: String) -> Bool {
  let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
  guard fd >= 0 else { return false }
  defer { close(fd) }
  var addr = sockaddr_un()
  addr.sun_family = sa_family_t(AF_UNIX)
  let bytes = Array(path.utf8)
  guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
  withUnsafeMutableBytes(of: &addr.sun_path) { buf in
    for (i, b) in bytes.enumerated() { buf[i] = b }
  }
  return withUnsafePointer(to: &addr) {
    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
  } == 0
}

/// A /proc file whole (Foundation's readers stop at the first 4 KiB: procfs reports size 0).
public func readProcFile(_ path: String) -> [UInt8] { MountInfo.read(path) }
