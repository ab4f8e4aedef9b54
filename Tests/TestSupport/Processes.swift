import Foundation

// Timing in tests: Swift Testing runs every test, synchronous ones included, on Swift's
// cooperative pool, which has one thread per core (two here). The synchronous tests hold a thread
// while they wait on processes and mounts, so an async test can sit unscheduled for a minute or
// more between two of its own lines. Never bound a duration measured on the test process's clock
// across an `await`: judge by what happened, or by another process's clock (TestServer's stall log).

/// A command that failed, with what it printed: test failures should say why.
public struct CommandError: Error, CustomStringConvertible {
  public let argv: [String]
  public let status: Int32
  public let stderr: String
  /// The command and its `error:` lines (Nix's own reasons), or the tail of stderr when it printed
  /// none.
  public var description: String {
    let lines = stderr.split(separator: "\n", omittingEmptySubsequences: true)
    var errors = lines.drop(while: { !$0.hasPrefix("error:") })
    if errors.isEmpty { errors = lines.suffix(20) }
    return "\(argv.joined(separator: " ")) exited \(status): \(errors.prefix(40).joined(separator: "\n"))"
  }
  public init(argv: [String], status: Int32, stderr: String) {
    self.argv = argv
    self.status = status
    self.stderr = stderr
  }
}

public struct CommandResult: Sendable {
  public let status: Int32
  public let stdout: [UInt8]
  public let stderr: String
  public var text: String { String(decoding: stdout, as: UTF8.self) }
  public var trimmed: String { text.trimmingCharacters(in: .whitespacesAndNewlines) }
}

/// Runs a program (looked up on PATH) to completion. stderr goes through a file so a chatty
/// program cannot fill a pipe and deadlock.
@discardableResult
public func run(
  _ argv: [String], environment: [String: String] = [:], stdin: [UInt8]? = nil,
  check: Bool = true, cwd: String? = nil
) throws -> CommandResult {
  let process = Process()
  process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
  process.arguments = argv
  var env = ProcessInfo.processInfo.environment
  env.merge(environment) { $1 }
  process.environment = env
  if let cwd { process.currentDirectoryURL = URL(fileURLWithPath: cwd) }
  let out = Pipe()
  process.standardOutput = out
  let errURL = FileManager.default.temporaryDirectory.appendingPathComponent("nixfs-stderr-\(UUID().uuidString)")
  _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
  let errHandle = try FileHandle(forWritingTo: errURL)
  defer {
    try? errHandle.close()
    try? FileManager.default.removeItem(at: errURL)
  }
  process.standardError = errHandle
  let input = Pipe()
  process.standardInput = stdin == nil ? FileHandle.nullDevice : input
  try process.run()
  if let stdin {
    // Feed stdin from another thread so a large input and a large output cannot deadlock.
    let writer = input.fileHandleForWriting
    Thread.detachNewThread {
      writer.write(Data(stdin))
      try? writer.close()
    }
  }
  let data = out.fileHandleForReading.readDataToEndOfFile()
  process.waitUntilExit()
  let err = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
  let result = CommandResult(status: process.terminationStatus, stdout: Array(data), stderr: err)
  if check && result.status != 0 {
    throw CommandError(argv: argv, status: result.status, stderr: err)
  }
  return result
}

/// A directory removed when the value is released.
public final class TemporaryDirectory: @unchecked Sendable {
  public let path: String

  /// `forProcess`: a fixture the test process keeps until it exits (a static `OnceFixture`), whose
  /// deinit never runs. Its name carries the process ID, and making one removes those of
  /// processes that are gone, so runs do not pile fixtures up in /tmp.
  public init(_ label: String = "test", forProcess: Bool = false, in directory: String? = nil) throws {
    let base = directory ?? ProcessInfo.processInfo.environment["NIXFS_TEST_TMP"] ?? NSTemporaryDirectory()
    let owner = forProcess ? "p\(getpid())-" : ""
    if forProcess { Self.removeLeftovers(label: label, in: base) }
    path = (base as NSString).appendingPathComponent("nixfs-\(label)-\(owner)\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  }

  /// Process fixtures of `label` whose process has exited.
  static func removeLeftovers(label: String, in base: String) {
    let prefix = "nixfs-\(label)-p"
    for name in (try? FileManager.default.contentsOfDirectory(atPath: base)) ?? [] where name.hasPrefix(prefix) {
      guard let pid = Int32(name.dropFirst(prefix.count).prefix { $0 != "-" }), pid > 0,
        kill(pid, 0) != 0, errno == ESRCH
      else { continue }
      remove((base as NSString).appendingPathComponent(name))
    }
  }

  static func remove(_ path: String) {
    // Anything a test left mounted below it (bind mounts of views, a FUSE mount) goes first,
    // deepest first, so removal never walks into a read-only or dead mount.
    unmountAll(under: path)
    // Store paths are read-only: make them writable before removing.
    _ = try? run(["chmod", "-R", "u+w", path], check: false)
    try? FileManager.default.removeItem(atPath: path)
  }

  public func sub(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }

  deinit { Self.remove(path) }
}

/// Lazily unmounts every mount point at or below `root`, deepest first.
public func unmountAll(under root: String) {
  let text = String(decoding: readProcFile("/proc/self/mountinfo"), as: UTF8.self)
  let points = text.split(separator: "\n").compactMap { line -> String? in
    let f = line.split(separator: " ")
    guard f.count > 4 else { return nil }
    let p = String(f[4])
    return p == root || p.hasPrefix(root + "/") ? p : nil
  }
  for p in points.sorted(by: { $0.count > $1.count }) {
    _ = try? run(["umount", "-l", p], check: false)
  }
}
