import ArgumentParser
import CSINode
import ChunkStore
import Foundation
import NixFormats
import NodeControl
import FuseMount
import NodeDaemon
import StoreFS
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

/// Subcommands of the chunk store layer.
let storeCommands: [any ParsableCommand.Type] = [
  IngestCommand.self, DumpCommand.self, GCCommand.self, FsckCommand.self, StatsCommand.self, StatusCommand.self,
]

/// A report as `--json` prints it: indented, keys sorted.
func printJSON(_ value: some Encodable) throws {
  let enc = JSONEncoder()
  enc.outputFormatting = [.prettyPrinted, .sortedKeys]
  print(String(decoding: try enc.encode(value), as: UTF8.self))
}

/// Bytes as the reports print them.
func mib(_ bytes: UInt64) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }

/// `nixfs status`: what the running daemon on a state directory is, runs with, and holds.
struct StatusCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "status",
    abstract: "The running daemon: version, settings and where each came from, caches, views, fetches, store usage.")
  @OptionGroup var state: StateOptions
  @Flag(help: "Print JSON.") var json = false

  func run() throws {
    guard let daemon = state.daemon() else {
      fail("no nixfs mount daemon answers on \(ControlSocket.path(stateDir: state.stateDir)) (is it running with --state-dir \(state.stateDir)?)")
    }
    let r: ControlResponse
    do { r = try daemon.send(.status, timeout: 60) } catch { fail("\(error)") }
    guard var s = r.status else { fail("the daemon did not report its status: \(r.message ?? "an older nixfs?")") }
    let writable = readWriteVolumes(stateDir: state.stateDir)
    s.readWriteVolumes = writable
    if json {
      try printJSON(s)
      return
    }
    print("nixfs \(s.version), pid \(s.pid), serving \(s.mountpoint) from \(s.stateDir)")
    print("store:      \(s.paths) complete and \(s.partialPaths) partial paths, \(mib(s.storedBytes)) stored"
      + (s.budgetBytes.map { " of \(mib($0)) (\(Int(Double(s.storedBytes) / Double(max($0, 1)) * 100))%)" } ?? ", no budget")
      + (s.chunksToFetch > 0 ? "; \(s.chunksToFetch) chunks of partial paths not fetched yet" : ""))
    print("volumes:    \(s.views.count)\(s.views.isEmpty ? "" : ": " + s.views.joined(separator: " "))")
    print("read-write: \(writable.count)\(writable.isEmpty ? "" : ": ")" + writable.map { v in
      "\(v.volumeID) (\(mib(v.writtenBytes)) written\(v.limitBytes.map { " of \(mib($0))" } ?? ""))"
    }.joined(separator: " "))
    if let p = s.passthrough { print("passthrough: \(p)") }
    print("fetching:   \(s.fetchesInFlight.isEmpty ? "nothing" : s.fetchesInFlight.joined(separator: " "))")
    print("caches:")
    for c in s.substituters {
      print("  \(c.url) (priority \(c.priority)\(c.chunkIndex.map { ", chunk index \($0)" } ?? ""))")
    }
    for u in s.unreachable { print("  \(u) (not answering)") }
    print("settings:")
    let width = s.settings.map(\.name.count).max() ?? 0
    for setting in s.settings {
      let name = setting.name.padding(toLength: width, withPad: " ", startingAt: 0)
      print("  \(name)  \(setting.value.isEmpty ? "(none)" : setting.value)  [\(setting.source)]")
    }
  }
}

struct StateOptions: ParsableArguments {
  @Option(help: "The node's state directory (index and chunk packs).")
  var stateDir: String = "/var/lib/nixfs"

  /// The running daemon on this state directory, if one answers: gc and fsck then go through it
  /// (it holds the store's writer lock).
  func daemon() -> ControlClient? {
    let socket = ControlSocket.path(stateDir: stateDir)
    guard FileManager.default.fileExists(atPath: socket) else { return nil }
    let client = ControlClient(path: socket)
    return (try? client.send(.ping, timeout: 5)) != nil ? client : nil
  }

  func open(readOnly: Bool = false) -> ChunkStore {
    do {
      return try ChunkStore(.init(stateDirectory: stateDir, readOnly: readOnly))
    } catch {
      fail("\(error)")
    }
  }
}

/// Parses `10G`, `512M`, `4096`, `1.5T` (binary units).
func parseSize(_ text: String) -> UInt64? {
  let units: [Character: Double] = ["K": 0x1p10, "M": 0x1p20, "G": 0x1p30, "T": 0x1p40]
  var t = text.uppercased()
  if t.hasSuffix("IB") { t.removeLast(2) } else if t.hasSuffix("B") { t.removeLast() }
  var factor = 1.0
  if let last = t.last, let f = units[last] {
    factor = f
    t.removeLast()
  }
  guard let n = Double(t), n >= 0 else { return nil }
  return UInt64(n * factor)
}

func parseStorePath(_ text: String) -> StorePath {
  do { return try storePathArgument(text) } catch { fail("\(error)") }
}

struct IngestCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "ingest",
    abstract: "Ingest a local uncompressed NAR as a store path, verifying its hash.",
    discussion: "The path becomes visible only once its NarHash is verified and its data durable.")
  @OptionGroup var state: StateOptions
  @Option(help: "The store path the NAR is the contents of.") var storePath: String
  @Option(help: "Its NarHash (sha256:<nix32>, hex or SRI).") var narHash: String
  @Option(help: "Its NarSize (default: the file's size).") var narSize: UInt64?
  @Option(name: .customLong("reference"), help: "A referenced store path (repeatable).") var references: [String] = []
  @Argument(help: "Uncompressed NAR file, or - for standard input (then --nar-size is required).") var file: String

  func run() throws {
    let path = parseStorePath(storePath)
    let hash: NixHash
    do { hash = try NixHash(parsing: narHash) } catch { fail("\(error)") }
    var size = narSize
    if size == nil && file != "-" {
      size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? NSNumber)?.uint64Value
    }
    guard let size else { fail("--nar-size is required when reading standard input (or \(file) is unreadable)") }
    let refs = references.map { r in
      (try? StorePath(r)) ?? (try? StorePath(baseName: r)) ?? { fail("invalid reference '\(r)'") }()
    }
    let store = state.open()
    let info = PathInfo(storePath: path, narHash: hash, narSize: size, references: refs)
    do {
      let ingest = try store.ingest(info)
      try forEachChunk(of: file) { try ingest.feed($0) }
      let m = try ingest.commit()
      print("\(path.path): \(m.nodes.count) nodes, \(m.fileBytes) file bytes")
    } catch ChunkStoreError.alreadyComplete {
      print("\(path.path): already in the store")
    } catch {
      fail("\(error)")
    }
  }
}

struct DumpCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "dump", abstract: "Write a stored path's NAR to standard output, byte-identical to the cache's.")
  @OptionGroup var state: StateOptions
  @Argument(help: "The store path.") var storePath: String

  func run() throws {
    let path = parseStorePath(storePath)
    // Read-only: dump works while the daemon holds the writer lock.
    let store = state.open(readOnly: true)
    do {
      try store.dump(path) { bytes in
        try bytes.withUnsafeBytes { b in
          guard let base = b.baseAddress else { return }
          do throws(SystemCallError) { try writeAll(1, base, b.count) } catch {
            throw ChunkStoreError.io(path: "standard output", operation: "write", errno: error.errno)
          }
        }
      }
    } catch {
      fail("\(error)")
    }
  }
}

struct GCCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "gc",
    abstract: "Evict least recently used store paths until the store fits in a size (pinned paths are kept).")
  @OptionGroup var state: StateOptions
  @Option(help: "Budget for stored chunk bytes, e.g. 20G, 512M.") var maxSize: String

  func run() throws {
    guard let budget = parseSize(maxSize) else { fail("--max-size: '\(maxSize)' is not a size (e.g. 20G)") }
    if let daemon = state.daemon() {
      _ = throughDaemon(daemon, .gc(maxStoredBytes: budget))
      return
    }
    let store = state.open()
    do {
      for line in Daemon.gcLines(try store.collectGarbage(maxStoredBytes: budget)) { print(line) }
    } catch {
      fail("\(error)")
    }
  }
}

struct FsckCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "fsck",
    abstract: "Verify the index and every chunk's digest; exit 0 only when the store is consistent.")
  @OptionGroup var state: StateOptions
  @Flag(help: "Remove bad chunks and mark the affected paths incomplete so they are fetched again.")
  var repair = false

  func run() throws {
    if let daemon = state.daemon() {
      if repair { fail("--repair needs the store to itself: stop the nixfs mount daemon on \(state.stateDir) first") }
      if throughDaemon(daemon, .fsck).consistent != true { throw ExitCode(1) }
      return
    }
    let store = state.open()
    let report: FsckReport
    do { report = try store.fsck(repair: repair) } catch { fail("\(error)") }
    for line in Daemon.fsckLines(report) { print(line) }
    if !report.isConsistent { throw ExitCode(1) }
  }
}

struct StatsCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "stats", abstract: "Paths, files, chunks, logical and stored bytes, dedup and compression ratios.")
  @OptionGroup var state: StateOptions
  @Flag(help: "Print JSON.") var json = false

  func run() throws {
    let store = state.open(readOnly: true)
    let s: StoreStats
    do { s = try store.stats() } catch { fail("\(error)") }
    if json {
      try printJSON(s)
      return
    }
    print("""
      paths:             \(s.paths) complete, \(s.partialPaths) partial, \(s.incompletePaths) incomplete
      chunks to fetch:   \(s.absentChunks) (\(mib(s.absentBytes)), of partial paths)
      files:             \(s.files) (\(s.contents) distinct contents)
      chunks:            \(s.chunks) (\(s.inlineChunks) inline in the index) in \(s.packs) packs
      NAR bytes:         \(s.narBytes) (\(mib(s.narBytes)))
      logical bytes:     \(s.logicalBytes) (\(mib(s.logicalBytes)))
      unique chunks:     \(s.chunkBytes) (\(mib(s.chunkBytes)))
      stored bytes:      \(s.storedBytes) (\(mib(s.storedBytes)))
      on disk:           \(s.diskBytes) (\(mib(s.diskBytes)))
      dedup ratio:       \(String(format: "%.2f", s.dedupRatio))
      compression ratio: \(String(format: "%.2f", s.compressionRatio))
      NAR / stored:      \(String(format: "%.2f", s.overallRatio))
      """)
  }
}

/// Runs a maintenance request (gc, fsck) through the running daemon and prints its report.
func throughDaemon(_ daemon: ControlClient, _ request: ControlRequest) -> ControlResponse {
  let r: ControlResponse
  do { r = try daemon.send(request, timeout: 86_400) } catch { fail("\(error)") }
  if let failure = r.failure { fail("\(failure): \(r.message ?? "")") }
  for line in r.report ?? [] { print(line) }
  print("(through the running daemon)")
  return r
}
