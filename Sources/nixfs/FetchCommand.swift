import ArgumentParser
import BinaryCache
import ChunkStore
import Foundation
import Logging
import NixFormats
import NodeControl
import NodeDaemon
import StoreFS

struct FetchCommand: AsyncParsableCommand {
  /// One status line, rewritten in place, and a line for each path as it completes.
  @Sendable static func showProgress(_ p: Substitution.Progress) {
    var text = "\r\u{1b}[K"
    if let done = p.completed { text += "fetched \(done.path)\n" }
    text += "[\(p.pathsDone)/\(p.pathsTotal) paths, \(mib(p.bytesDone)) of \(mib(p.bytesTotal))]"
    if p.pathsDone == p.pathsTotal { text += "\n" }
    FileHandle.standardError.write(Data(text.utf8))
  }

  static let configuration = CommandConfiguration(
    commandName: "fetch",
    abstract: "Materialise store paths and their closures into the state directory now (prefetch).")

  @OptionGroup var cache: CacheOptions
  @Option(help: "Paths fetched at once.") var parallel: Int = 4
  @Flag(help: "No progress on the terminal, only the summary.") var quiet = false
  @Argument(help: "Store paths.") var paths: [String]

  func run() async throws {
    let logger = bootstrapLogging(level: "info", label: "nixfs.fetch")
    let roots: [StorePath]
    do { roots = try paths.map { try storePathArgument($0) } } catch { fail("\(error)") }
    // A running daemon owns the store: ask it, so its lookups share the downloads.
    let socket = ControlSocket.path(stateDir: cache.stateDir)
    if FileManager.default.fileExists(atPath: socket) {
      let client = ControlClient(path: socket)
      if (try? client.send(.ping, timeout: 5)) != nil {
        let r: ControlResponse
        do { r = try client.send(.fetch(storePaths: roots.map(\.path), parallel: parallel), timeout: 86_400) } catch {
          fail("\(error)")
        }
        if let failure = r.failure { fail("\(failure): \(r.message ?? "")") }
        print(
          "\(r.closure?.count ?? 0) paths in the closure, \(r.fetched ?? 0) fetched (through the running daemon, "
            + "with its caches and keys)")
        return
      }
    }
    let store: ChunkStore
    do { store = try ChunkStore(.init(stateDirectory: cache.stateDir)) } catch {
      let daemon = FileManager.default.fileExists(atPath: socket)
      fail(
        "\(error)"
          + (daemon
            ? " (a nixfs mount daemon seems to own it but did not answer on \(socket))"
            : " (is another nixfs process using this state directory?)"))
    }
    let client: BinaryCacheClient
    do { client = try cache.client(logger: logger) } catch { fail("\(error)") }
    let substitution = Substitution(cache: client, store: store, logger: logger)
    // Progress as `nix copy` shows it, on a terminal only: logs stay quiet.
    let onTerminal = !quiet && isatty(STDERR_FILENO) != 0
    let report: (@Sendable (Substitution.Progress) -> Void)? = onTerminal ? Self.showProgress : nil
    do {
      let r = try await substitution.fetchClosure(of: roots, parallel: parallel, progress: report)
      print("\(r.paths) paths in the closure, \(r.fetched) fetched (\(r.narBytes) NAR bytes)")
    } catch {
      fail("\(error)")
    }
  }
}
