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
  @Flag(help: "Build what nodes ask for (nixExpr, flakeRef, derivations no cache has) with Nix, in a store of the serve's own; needs --secret-key-file and --build-credentials-file.")
  var build = false
  @Option(help: "The nix binary builds use (its directory must hold nix-build and nix-store too).") var nix: String = "/usr/bin/nix"
  @Option(help: "Where the builder's Nix store, settings and logs live (default: STATE-DIR/build).") var buildStore: String?
  @Option(help: "Seconds one build may take before it is killed.") var buildTimeout: Double = 3600
  @Option(help: "Builds run at once; the others wait.") var maxBuilds: Int = 2
  @Option(help: "Seconds a build request waits for its build before answering that it is still building.") var buildWait: Double = 5
  @Option(help: "Who may ask for builds: one a line, 'bearer TOKEN' or 'USER:PASSWORD' (nodes send their netrc's).")
  var buildCredentialsFile: String?
  @Option(help: "Nix's sandbox setting for builds (true, false or relaxed).") var buildSandbox: String = "false"
  @Option(help: "Nix's remote builders (its 'builders' setting, e.g. @/etc/nix/machines), so builds leave the serve's pod.")
  var builders: String?
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
    var builder: Builder? = nil
    if build {
      guard let key = indexKey else { fail("--build needs --secret-key-file: what the serve builds it signs") }
      guard let file = buildCredentialsFile else { fail("--build needs --build-credentials-file: building runs code, so requests need a credential") }
      guard ["true", "false", "relaxed"].contains(buildSandbox) else { fail("--build-sandbox \(buildSandbox): expected true, false or relaxed") }
      guard FileManager.default.isExecutableFile(atPath: nix) else { fail("--nix \(nix): not an executable") }
      do {
        let config = try cache.configuration()
        let settings = BuildSettings(
          nixDirectory: (nix as NSString).deletingLastPathComponent,
          directory: buildStore ?? (cache.stateDir as NSString).appendingPathComponent("build"),
          substituters: config.substituters, trustedKeys: config.trustedPublicKeys,
          timeout: buildTimeout, maxBuilds: maxBuilds, wait: buildWait, sandbox: buildSandbox, builders: builders, key: key,
          credentials: try UploadCredentials(file: file))
        builder = try Builder(settings: settings, cache: pull, logger: logger)
      } catch {
        fail("--build: \(error)")
      }
    }
    let server = ServeServer(
      cache: pull, host: host, port: port, priority: priority, uploads: uploads, indexKey: indexKey,
      idleTimeout: idleTimeout, profiles: profiles, builder: builder, logger: logger)
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
