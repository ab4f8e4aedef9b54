import ArgumentParser
import BinaryCache
import Foundation
import Logging
import NixFormats
import NodeControl

/// Subcommands of the cache client layer.
let cacheCommands: [any ParsableCommand.Type] = [PathInfoCommand.self, ProbeCommand.self]

/// The binary cache options, spelled as Nix spells them; shared by every command that substitutes.
/// Flags win over `--nix-conf`; a repeatable flag given at all replaces the nix.conf list.
struct CacheOptions: ParsableArguments {
  @Option(name: .customLong("substituter"), help: "Binary cache URL: http://, https://, file:// or s3://BUCKET?region=…&endpoint=… (repeatable; ?priority=N overrides the cache's Priority).")
  var substituters: [String] = []

  @Option(name: .customLong("trusted-public-key"), help: "Key whose signatures are trusted, name:base64 (repeatable).")
  var trustedPublicKeys: [String] = []

  @Flag(name: .customLong("no-require-sigs"), help: "Accept unsigned paths. Only for private caches you control.")
  var noRequireSigs = false

  @Option(name: .customLong("netrc-file"), help: "netrc file with credentials for the caches.")
  var netrcFile: String?

  @Option(name: .customLong("nix-conf"), help: "Read the cache settings from this nix.conf (substituters, trusted-public-keys, require-sigs, netrc-file, timeouts, narinfo cache TTLs, ...; see Documentation/configuration.md). Flags win.")
  var nixConf: String?

  @Option(name: .customLong("connect-timeout"), help: "Seconds to establish a connection (default 10).")
  var connectTimeout: Double?

  @Option(name: .customLong("stall-timeout"), help: "Seconds after which a transfer that received less than --low-speed-limit bytes/s in them is abandoned and retried (default 30).")
  var stallTimeout: Double?

  @Option(name: .customLong("low-speed-limit"), help: "Bytes per second below which a transfer counts as stalled (default 1024).")
  var lowSpeedLimit: Double?

  @Option(name: .customLong("nar-url-host"), help: "A host (host or host:port) that absolute NAR URLs in narinfos may point at besides their substituter's own (repeatable).")
  var narURLHosts: [String] = []

  @Option(name: .customLong("narinfo-cache-positive-ttl"), help: "Seconds a found narinfo is remembered (default 30 days).")
  var positiveTTL: Double?

  @Option(name: .customLong("narinfo-cache-negative-ttl"), help: "Seconds a missing narinfo is remembered (default 3600).")
  var negativeTTL: Double?

  @Option(name: .customLong("state-dir"), help: "The node's state: chunk store, narinfo cache, control socket (path-info keeps only its narinfo cache there).")
  var stateDir = "/var/lib/nixfs"

  func configuration() throws -> CacheConfiguration {
    var config = CacheConfiguration()
    if let file = nixConf {
      let settings: [String: String]
      do { settings = try NixConf.load(file: file) } catch let e as NixConf.ParseError {
        throw ValidationError("\(e)")
      } catch {
        throw ValidationError("cannot read \(file): \(error.localizedDescription)")
      }
      try config.apply(nixConf: settings)
    }
    if !substituters.isEmpty { config.substituters = substituters }
    if !trustedPublicKeys.isEmpty { config.trustedPublicKeys = trustedPublicKeys }
    if noRequireSigs { config.requireSignatures = false }
    if let netrcFile { config.netrcFile = netrcFile }
    if let connectTimeout { config.connectTimeout = connectTimeout }
    if let stallTimeout {
      guard stallTimeout > 0 else { throw ValidationError("--stall-timeout must be positive") }
      config.stallTimeout = stallTimeout
    }
    if let lowSpeedLimit {
      guard lowSpeedLimit >= 0 else { throw ValidationError("--low-speed-limit must not be negative") }
      config.lowSpeedLimit = lowSpeedLimit
    }
    config.narURLHosts += narURLHosts
    if let positiveTTL { config.narinfoCachePositiveTTL = positiveTTL }
    if let negativeTTL { config.narinfoCacheNegativeTTL = negativeTTL }
    config.stateDirectory = stateDir
    return config
  }

  /// The cache settings in effect, each with where it came from (`nixfs status`).
  func settings() throws -> [DaemonStatus.Setting] {
    let config = try configuration()
    let conf = nixConf.flatMap { try? NixConf.load(file: $0) } ?? [:]
    func from(_ flag: Bool, _ keys: String...) -> String {
      flag ? "flag" : keys.contains { conf[$0] != nil } ? "nix.conf \(nixConf ?? "")" : "default"
    }
    return [
      .init(name: "substituters", value: config.substituters.joined(separator: " "), source: from(!substituters.isEmpty, "substituters", "extra-substituters")),
      .init(
        name: "trusted-public-keys", value: config.trustedPublicKeys.map { String($0.split(separator: ":").first ?? "") }.joined(separator: " "),
        source: from(!trustedPublicKeys.isEmpty, "trusted-public-keys", "extra-trusted-public-keys")),
      .init(name: "require-sigs", value: "\(config.requireSignatures)", source: from(noRequireSigs, "require-sigs")),
      .init(name: "netrc-file", value: config.netrcFile ?? "", source: from(netrcFile != nil, "netrc-file")),
      .init(name: "connect-timeout", value: "\(config.connectTimeout)", source: from(connectTimeout != nil, "connect-timeout")),
      .init(name: "stalled-download-timeout", value: "\(config.stallTimeout)", source: from(stallTimeout != nil, "stalled-download-timeout")),
      .init(name: "low-speed-limit", value: "\(config.lowSpeedLimit)", source: from(lowSpeedLimit != nil)),
      .init(name: "narinfo-cache-positive-ttl", value: "\(config.narinfoCachePositiveTTL)", source: from(positiveTTL != nil, "narinfo-cache-positive-ttl")),
      .init(name: "narinfo-cache-negative-ttl", value: "\(config.narinfoCacheNegativeTTL)", source: from(negativeTTL != nil, "narinfo-cache-negative-ttl")),
      .init(name: "http-connections", value: "\(config.maxConnections)", source: from(false, "http-connections")),
      .init(name: "download-attempts", value: "\(config.maxAttempts)", source: from(false, "download-attempts")),
    ]
  }

  func client(logger: Logger = Logger(label: "nixfs.cache")) throws -> BinaryCacheClient {
    try BinaryCacheClient(configuration: try configuration(), logger: logger)
  }
}

struct PathInfoCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "path-info", abstract: "Show what the binary caches say about store paths (like `nix path-info`).")

  @Flag(name: .shortAndLong, help: "Include the closure: every path referenced, transitively.")
  var recursive = false

  @OptionGroup var cache: CacheOptions

  @Argument(help: "Store paths (/nix/store/<hash>-<name>, a path inside one, or <hash>-<name>).")
  var paths: [String]

  func run() async throws {
    let client: BinaryCacheClient
    var roots: [StorePath] = []
    do {
      client = try cache.client()
      let storeDir = client.configuration.storeDir
      for p in paths { roots.append(try storePathArgument(p, storeDir: storeDir)) }
    } catch {
      fail("\(error)")
    }
    do {
      var infos: [CachedPathInfo] = []
      if recursive {
        infos = Array(try await client.closure(of: roots).values)
      } else {
        for root in roots { infos.append(try await client.narInfo(for: root)) }
      }
      for found in infos.sorted(by: { $0.info.storePath < $1.info.storePath }) { print(Self.describe(found)) }
    } catch {
      fail("\(error)")
    }
  }

  static func describe(_ found: CachedPathInfo) -> String {
    let info = found.info
    var lines = ["\(info.storePath.path)"]
    lines.append("  substituter: \(found.substituter.url)")
    lines.append("  NAR: \(info.narSize) bytes, \(info.narHash)")
    let file = info.fileSize.map { "\($0) bytes" } ?? "size unknown"
    lines.append("  file: \(info.url) (\(info.compression), \(file))")
    let refs = info.references.map(\.baseName)
    lines.append("  references: \(refs.isEmpty ? "none" : refs.joined(separator: " "))")
    if let deriver = info.deriver { lines.append("  deriver: \(deriver)") }
    if let ca = info.ca { lines.append("  ca: \(ca)") }
    let signers = info.signatures.map(\.keyName)
    let verified = found.signer.map { " (verified: \($0))" } ?? " (NOT verified: --no-require-sigs)"
    lines.append("  signers: \(signers.isEmpty ? "none" : signers.joined(separator: ", "))\(verified)")
    return lines.joined(separator: "\n")
  }
}

/// The one store-path grammar of every command: `/nix/store/<hash>-<name>`, a path inside one
/// (`/nix/store/<hash>-<name>/bin/x`, as `nix path-info` takes), or `<hash>-<name>`.
func storePathArgument(_ text: String, storeDir: String = StorePath.defaultStoreDir) throws -> StorePath {
  if text.hasPrefix(storeDir + "/") {
    let rest = text.dropFirst(storeDir.count + 1)
    let base = rest.split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
    return try StorePath(baseName: base, storeDir: storeDir)
  }
  return try StorePath(baseName: text, storeDir: storeDir)
}

struct ProbeCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "probe",
    abstract: "Check every substituter: reachable, its nix-cache-info, and (given paths) narinfos verified against the trusted keys.",
    discussion: "Prints one line per check; exits 1 when anything failed, with one line per problem.")

  @OptionGroup var cache: CacheOptions

  @Argument(help: "Sample store paths whose narinfos each substituter is asked for and verified.")
  var paths: [String] = []

  func run() async throws {
    _ = bootstrapLogging(level: "critical", label: "nixfs.probe")
    let quiet = Logger(label: "nixfs.probe") { _ in SwiftLogNoOpLogHandler() }
    let client: BinaryCacheClient
    do { client = try cache.client(logger: quiet) } catch { fail("\(error)") }
    var samples: [StorePath] = []
    do { samples = try paths.map { try storePathArgument($0) } } catch { fail("\(error)") }
    var problems: [String] = []
    if client.configuration.substituters.isEmpty { problems.append("no substituters are configured") }
    if !client.hasTrustedKeys && client.configuration.requireSignatures {
      problems.append("no trusted public keys are configured: every path would be refused")
    }
    for (url, result) in await client.probeSubstituters() {
      switch result {
      case .failure(let error):
        problems.append("\(LogText.bounded(url)): \(error)")
      case .success(let substituter):
        print("ok   \(substituter.url): nix-cache-info: StoreDir \(client.configuration.storeDir), Priority \(substituter.priority)")
        for path in samples {
          do {
            guard let found = try await client.narInfo(for: path, from: substituter) else {
              print("miss \(substituter.url): \(path) is not there")
              continue
            }
            print("ok   \(substituter.url): \(path): \(found.signer.map { "signed by \($0)" } ?? "unsigned (signatures not required)")")
          } catch {
            problems.append("\(substituter.url): \(error)")
          }
        }
      }
    }
    for problem in problems { FileHandle.standardError.write(Data("nixfs: probe: \(problem)\n".utf8)) }
    if !problems.isEmpty { throw ExitCode(1) }
  }
}
