import BinaryCache
import Foundation
import Logging
import NixFormats
import TestSupport

/// A real binary cache made by `nix copy --to file://` in one compression, signed by a key Nix
/// generated: a small tree and one with a 2 MiB incompressible file (so a NAR download can be cut
/// in the middle).
struct CacheFixture {
  let tmp: TemporaryDirectory
  let nix: NixFixture
  let cache: String
  let publicKey: String
  let secretKeyFile: String
  let small: StorePath
  let big: StorePath
  let trees: [StorePath: String]

  init(compression: String = "zstd", keyName: String = "test-key-1") throws {
    tmp = try TemporaryDirectory("bc")
    nix = NixFixture(in: tmp.path)
    (secretKeyFile, publicKey) = try nix.generateKey(keyName)
    let smallTree = tmp.sub("small")
    try Tree.file("\(smallTree)/bin/hello", "#!/bin/sh\necho hello\n", executable: true)
    try Tree.file("\(smallTree)/share/data", Tree.bytes(5000, seed: 3))
    try Tree.symlink("\(smallTree)/lib", to: "share")
    let bigTree = tmp.sub("big")
    try Tree.file("\(bigTree)/blob", Tree.bytes(2 << 20, seed: 11))
    try Tree.file("\(bigTree)/README", "a big one\n")
    small = try StorePath(try nix.add(smallTree))
    big = try StorePath(try nix.add(bigTree))
    trees = [small: smallTree, big: bigTree]
    try nix.sign([small.path, big.path], keyFile: secretKeyFile)
    cache = tmp.sub("binary-cache")
    try nix.copy([small.path, big.path], toCache: cache, compression: compression)
  }

  func narinfoFile(_ path: StorePath) -> String { "\(cache)/\(path.hashPart).narinfo" }

  func info(_ path: StorePath) throws -> NarInfo {
    try NarInfo(parsing: try String(contentsOfFile: narinfoFile(path), encoding: .utf8))
  }

  /// The URL path of the NAR file, as the server sees it.
  func narPath(_ path: StorePath) throws -> String { "/" + (try info(path)).url }

  func nar(_ path: StorePath) throws -> [UInt8] { try NixFixture.dump(trees[path]!) }
}

let quiet = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }

func makeClient(
  _ substituters: [String], keys: [String], _ tweak: (inout CacheConfiguration) -> Void = { _ in }
) throws -> BinaryCacheClient {
  var config = CacheConfiguration()
  config.substituters = substituters
  config.trustedPublicKeys = keys
  config.retryBaseDelay = 0.01
  config.connectTimeout = 5
  config.stallTimeout = 10
  tweak(&config)
  return try BinaryCacheClient(configuration: config, logger: quiet)
}

/// Expects `body` to throw a CacheError and returns it.
func cacheError(_ body: () async throws -> Void) async -> CacheError? { await caught(CacheError.self, body) }

/// Fetches the big path's NAR (uncompressed) from a server with `fault` on it, one attempt, and
/// returns the client's error and the server's record of the response: when it went quiet (or
/// started trickling) and when the client hung up, by the server's clock.
func fetchBigNAR(with fault: TestServer.Fault, stallTimeout: Double) async throws -> (error: CacheError?, nar: String, stall: TestServer.Stall?) {
  let f = try CacheFixture(compression: "none")
  let nar = try f.narPath(f.big)
  var config = TestServer.Config()
  config.faults[nar] = [fault]
  let server = try TestServer(serving: f.cache, config: config)
  defer { server.stop() }
  let client = try makeClient([server.url], keys: [f.publicKey]) {
    $0.stallTimeout = stallTimeout
    $0.maxAttempts = 1
  }
  let found = try await client.narInfo(for: f.big)
  let error = await cacheError { try await client.fetchNAR(found, into: NARBuffer()) }
  return (error, nar, await server.waitForStall(of: nar) { $0.hungUp != nil })
}
