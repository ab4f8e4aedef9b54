import ArgumentParser
import BinaryCache
import ChunkStore
import Foundation
import Logging
import NixFormats
import NixServe

struct ServeCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "serve",
    abstract: "Serve a Nix binary cache that pulls each path through from the substituters once, verified.",
    discussion: """
      Plain Nix (`nix copy --from`, `substituters = http://...`) and nixfs nodes use it as a binary cache. \
      A narinfo request for a path the store lacks fetches it from the substituters (signature, NarHash \
      and NarSize checked) before answering; concurrent requests share one download. Runs until SIGTERM.
      """)

  @OptionGroup var cache: CacheOptions
  @Option(help: "Address and port to listen on (port 0: any free port, printed at start).")
  var listen: String = "0.0.0.0:8080"
  @Option(help: "Keep the chunk store under this size, evicting least recently used paths (e.g. 500G).")
  var maxSize: String?
  @Option(help: "Priority announced in nix-cache-info (lower is asked first; cache.nixos.org says 40).")
  var priority: Int = 30
  @Option(help: "Seconds a connection may be idle (nothing read or written) before it is closed.")
  var idleTimeout: Double = 60
  @Option(help: "Seconds a path that no substituter has is remembered as missing.")
  var negativeTTL: Double = 60
  @Option(help: "Accept uploads (nix copy --to) from these credentials: one a line, 'bearer TOKEN' or 'USER:PASSWORD'. Without it, uploads are refused.")
  var uploadCredentialsFile: String?
  @Option(help: "The largest NAR file one upload may send (e.g. 8G).") var maxUploadSize: String = "8G"
  @Option(help: "Sign chunk indexes with this key (Nix's format, as from nix-store --generate-binary-cache-key); without it, no chunk index is offered.")
  var secretKeyFile: String?
  @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
  @Option(help: "Log lines as text, or as one JSON object each (json).") var logFormat: LogFormat = .text

  func validate() throws { try checkLogLevel(logLevel) }

  func run() async throws {
    let logger = bootstrapLogging(level: logLevel, label: "nixfs.serve", format: logFormat)
    guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
      (0...65535).contains(port)
    else { fail("--listen \(listen): expected HOST:PORT") }
    var host = String(listen[..<colon])
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    if host.isEmpty || host == "*" { host = "0.0.0.0" }
    var maxBytes: UInt64? = nil
    if let maxSize {
      guard let n = parseSize(maxSize) else { fail("--max-size \(maxSize): expected a size such as 500G") }
      maxBytes = n
    }
    let store: ChunkStore
    do { store = try ChunkStore(.init(stateDirectory: cache.stateDir, maxStoredBytes: maxBytes)) } catch { fail("\(error)") }
    let client: BinaryCacheClient
    do { client = try cache.client(logger: logger) } catch { fail("\(error)") }
    let pull = PullThroughCache(store: store, upstream: client, negativeTTL: negativeTTL, logger: logger)
    var uploads: (area: UploadArea, credentials: UploadCredentials)? = nil
    if let file = uploadCredentialsFile {
      guard let limit = parseSize(maxUploadSize) else { fail("--max-upload-size \(maxUploadSize): expected a size such as 8G") }
      do {
        let config = try cache.configuration()
        let credentials = try UploadCredentials(file: file)
        let area = try UploadArea(
          stateDirectory: cache.stateDir, cache: pull, trustedKeys: config.trustedPublicKeys,
          requireSignatures: config.requireSignatures, maxBytes: limit, logger: logger)
        uploads = (area, credentials)
      } catch {
        fail("--upload-credentials-file \(file): \(error)")
      }
    }
    var indexKey: SecretKey? = nil
    if let file = secretKeyFile {
      do {
        let text = try String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        indexKey = try SecretKey(parsing: text)
      } catch {
        fail("--secret-key-file \(file): \(error)")
      }
    }
    var profiles: StartupProfiles? = nil
    if indexKey != nil {
      do { profiles = try StartupProfiles(stateDirectory: cache.stateDir, store: store, logger: logger) } catch {
        fail("\(cache.stateDir)/profiles: \(error)")
      }
    }
    let server = ServeServer(
      cache: pull, host: host, port: port, priority: priority, uploads: uploads, indexKey: indexKey,
      idleTimeout: idleTimeout, profiles: profiles, logger: logger)
    let shown = host.contains(":") ? "[\(host)]" : host
    do {
      try await server.run { bound in
        // One line on stdout for scripts and tests; the rest of the log goes to stderr.
        FileHandle.standardOutput.write(Data("nixfs serve: listening on http://\(shown):\(bound)\n".utf8))
      }
    } catch {
      fail("cannot serve on \(listen): \(error)")
    }
  }
}
