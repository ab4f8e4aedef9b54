import BinaryCache
import Foundation
import NixFormats
import Testing
import TestSupport

@Suite struct DownloadTests {
  /// Real caches in every compression, over real HTTP: narinfo verified, NAR bytes exactly what
  /// `nix-store --dump` gives for the tree.
  @Test(arguments: ["xz", "zstd", "bzip2", "none"])
  func realCacheOverHTTP(compression: String) async throws {
    let f = try CacheFixture(compression: compression)
    let server = try TestServer(serving: f.cache)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    for path in [f.small, f.big] {
      let found = try await client.narInfo(for: path)
      #expect(found.info.compression.description == compression)
      #expect(found.signer == "test-key-1")
      #expect(found.substituter.url == server.url)
      #expect(try await client.narBytes(found) == (try f.nar(path)))
    }
    // The User-Agent names nixfs and its version.
    #expect(BinaryCacheClient.userAgent.hasPrefix("nixfs/\(NixFSVersion.string) "))
  }

  @Test func fileSubstituterAndEventSink() async throws {
    let f = try CacheFixture(compression: "xz")
    let client = try makeClient(["file://\(f.cache)"], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.small)
    #expect(try await client.narBytes(found) == (try f.nar(f.small)))
    // The event adapter sees the tree.
    let names = Locked([String]())
    let sink = NAREventSink(totalSize: found.info.narSize) { event in
      if case .file(let name, _, let executable, _)? = event {
        names.withLock { $0.append(String(decoding: name, as: UTF8.self) + (executable ? "*" : "")) }
      }
    }
    try await client.fetchNAR(found, into: sink)
    #expect(names.withLock { $0 } == ["hello*", "data"])
    let missing = try StorePath("/nix/store/00000000000000000000000000000000-missing")
    let error = await cacheError { _ = try await client.narInfo(for: missing) }
    guard case .notFound = error else {
      Issue.record("expected notFound, got \(String(describing: error))")
      return
    }
  }

  @Test func cutMidNARResumesWithRange() async throws {
    let f = try CacheFixture(compression: "zstd")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    config.faults[nar] = [.init(cut: 700_000, times: 1), .init(cut: 500_000, times: 1)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.big)
    let sink = NARBuffer()
    try await client.fetchNAR(found, into: sink)
    #expect(sink.bytes == (try f.nar(f.big)))
    #expect(sink.resets == 0)
    let ranges = server.requests(for: nar).map { $0.split(separator: " ")[2] }
    #expect(ranges == ["-", "bytes=700000-", "bytes=1200000-"])
  }

  @Test func cutMidNARRestartsWhenRangeIsIgnored() async throws {
    let f = try CacheFixture(compression: "xz")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    config.range = false
    config.faults[nar] = [.init(cut: 500_000, times: 1)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.big)
    let sink = NARBuffer()
    try await client.fetchNAR(found, into: sink)
    #expect(sink.bytes == (try f.nar(f.big)))
    #expect(sink.resets == 1)
    #expect(server.requests(for: nar).count == 2)
  }

  @Test func serverErrorThenSuccessIsRetried() async throws {
    let f = try CacheFixture(compression: "zstd")
    let narinfo = "/\(f.small.hashPart).narinfo"
    let nar = try f.narPath(f.small)
    var config = TestServer.Config()
    config.faults[narinfo] = [.init(status: 500, times: 1)]
    config.faults[nar] = [.init(status: 503, times: 1), .init(status: 429, times: 1)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.small)
    #expect(try await client.narBytes(found) == (try f.nar(f.small)))
    #expect(server.requests(for: narinfo).count == 2)
    #expect(server.requests(for: nar).count == 3)
  }

  @Test func persistentServerErrorGivesUpAfterAttempts() async throws {
    let f = try CacheFixture(compression: "zstd")
    let narinfo = "/\(f.small.hashPart).narinfo"
    var config = TestServer.Config()
    config.faults[narinfo] = [.init(status: 502)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey]) { $0.maxAttempts = 3 }
    let error = await cacheError { _ = try await client.narInfo(for: f.small) }
    guard case .httpStatus(let url, 502, 3)? = error else {
      Issue.record("expected HTTP 502 after 3 attempts, got \(String(describing: error))")
      return
    }
    #expect(url == server.url + narinfo)
    #expect(server.requests(for: narinfo).count == 3)
  }

  @Test func notFoundIsNotRetried() async throws {
    let f = try CacheFixture(compression: "zstd")
    let server = try TestServer(serving: f.cache)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let missing = try StorePath("/nix/store/00000000000000000000000000000000-missing")
    let error = await cacheError { _ = try await client.narInfo(for: missing) }
    guard case .notFound(let path, let asked)? = error else {
      Issue.record("expected notFound, got \(String(describing: error))")
      return
    }
    #expect(path == missing.path)
    #expect(asked == [server.url])
    #expect(server.requests(for: "/\(missing.hashPart).narinfo").count == 1)
    // A NAR that is gone (404) is an error, not retried either.
    var info = try f.info(f.small)
    info.url = "nar/gone.nar.zst"
    let subs = await client.substituters()
    let narError = await cacheError { try await client.fetchNAR(info, from: subs[0], into: NARBuffer()) }
    guard case .httpStatus(_, 404, 1)? = narError else {
      Issue.record("expected HTTP 404, got \(String(describing: narError))")
      return
    }
    #expect(server.requests(for: "/nar/gone.nar.zst").count == 1)
  }

  @Test func stalledBodyTimesOut() async throws {
    let (error, nar, stall) = try await fetchBigNAR(with: .init(stall: 100_000), stallTimeout: 2)
    guard case .stalled(let url, 2, _)? = error else {
      Issue.record("expected a stall, got \(String(describing: error))")
      return
    }
    #expect(url.hasSuffix(nar))
    // The client hung up on the silent server, by the server's clock (generous: proves "no
    // hang", not a timing; the test's own clock stretches while other tests hold its threads).
    let s = try #require(stall)
    #expect(s.hungUp! - s.began < 20)
  }

  @Test func cancellingAbortsATransfer() async throws {
    let f = try CacheFixture(compression: "none")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    config.faults[nar] = [.init(stall: 50_000)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    // Only the cancellation can end this transfer before the server gives up after 300 s.
    let client = try makeClient([server.url], keys: [f.publicKey]) { $0.stallTimeout = 3600 }
    let found = try await client.narInfo(for: f.big)
    let task = Task { try await client.fetchNAR(found, into: NARBuffer()) }
    // Cancel mid-body, once the server has gone silent.
    try #require(await server.waitForStall(of: nar) != nil)
    task.cancel()
    let cancelledAt = Date().timeIntervalSince1970
    let result = await task.result
    guard case .failure(CacheError.cancelled(let url)) = result else {
      Issue.record("expected cancelled, got \(result)")
      return
    }
    #expect(url.hasSuffix(nar))
    // The connection itself was dropped, soon after the cancel (by the server's clock).
    let stall = try #require(await server.waitForStall(of: nar) { $0.hungUp != nil })
    #expect(stall.hungUp! - cancelledAt < 10)
  }

  @Test func wrongBytesAreRefused() async throws {
    let f = try CacheFixture(compression: "none")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    // Inside the 2 MiB file's contents: the NAR still parses, only the hashes can tell.
    config.faults[nar] = [.init(corrupt: 1_000_000)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.big)
    let error = await cacheError { _ = try await client.narBytes(found) }
    guard case .hashMismatch(let url, let field, let expected, let actual)? = error else {
      Issue.record("expected a hash mismatch, got \(String(describing: error))")
      return
    }
    // Uncompressed, FileHash is checked first.
    #expect(field == "FileHash" || field == "NarHash")
    #expect(url == server.url + nar)
    #expect(expected != actual)
    let text = error!.description
    #expect(text.contains(server.url + nar) && text.contains(expected.description) && text.contains(actual.description))
    // Not retried: the same bytes would come back.
    #expect(server.requests(for: nar).count == 1)
  }

  @Test func corruptCompressedStreamIsRefused() async throws {
    let f = try CacheFixture(compression: "zstd")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    config.faults[nar] = [.init(corrupt: 300_000)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.big)
    let error = await cacheError { _ = try await client.narBytes(found) }
    switch error {
    case .decompression?, .hashMismatch?: break
    default: Issue.record("expected a refusal, got \(String(describing: error))")
    }
  }

  /// Also with a sink that hashes the NAR itself (the download then asks it for the NarHash).
  @Test(arguments: [false, true])
  func failingSubstituterFallsThroughForNARs(sinkHashes: Bool) async throws {
    let f = try CacheFixture(compression: "zstd")
    let nar = try f.narPath(f.big)
    var config = TestServer.Config()
    config.faults[nar] = [.init(corrupt: 1_500_000)]
    let bad = try TestServer(serving: f.cache, config: config)
    defer { bad.stop() }
    let good = try TestServer(serving: f.cache)
    defer { good.stop() }
    let client = try makeClient([bad.url, good.url], keys: [f.publicKey])
    let buffer = NARBuffer()
    let used = try await client.fetchNAR(for: f.big, into: sinkHashes ? HashingBuffer(buffer) : buffer)
    #expect(used.substituter.url == good.url)
    #expect(buffer.bytes == (try f.nar(f.big)))
    #expect(buffer.resets == 1)
  }
}

/// A NARBuffer that also hashes what it gets, like the chunk store's ingest; `lie` reports a
/// wrong hash.
final class HashingBuffer: NARSink, @unchecked Sendable {
  let buffer: NARBuffer
  private var hasher = NixHasher()
  let lie: Bool
  init(_ buffer: NARBuffer = NARBuffer(), lie: Bool = false) {
    self.buffer = buffer
    self.lie = lie
  }
  func write(_ piece: UnsafeRawBufferPointer) throws {
    try buffer.write(piece)
    hasher.update(piece)
  }
  func reset() throws {
    try buffer.reset()
    hasher = NixHasher()
  }
  var computesNARHash: Bool { true }
  func writtenNARHash() -> NixHash? { lie ? NixHash.sha256([0]) : hasher.finalize() }
}

extension DownloadTests {
  /// A sink that hashes the NAR itself is asked for the hash instead of the download hashing the
  /// same bytes again: its hash is what gets compared (a lying sink is caught by NarHash). Failing
  /// over with such a sink: `failingSubstituterFallsThroughForNARs`.
  @Test func aSinkThatHashesIsAskedForTheNarHash() async throws {
    let f = try CacheFixture(compression: "zstd")
    let good = try TestServer(serving: f.cache)
    defer { good.stop() }
    let client = try makeClient([good.url], keys: [f.publicKey])
    let found = try await client.narInfo(for: f.big)
    let honest = HashingBuffer()
    try await client.fetchNAR(found, into: honest)
    #expect(honest.buffer.bytes == (try f.nar(f.big)))
    let liar = HashingBuffer(lie: true)
    let error = await cacheError { try await client.fetchNAR(found, into: liar) }
    guard case .hashMismatch(_, "NarHash", _, let actual)? = error else {
      Issue.record("expected a NarHash mismatch, got \(String(describing: error))")
      return
    }
    #expect(actual == NixHash.sha256([0]))
  }
}

@Suite struct NarInfoLookupTests {
  @Test func truncatedNarInfoIsRefused() async throws {
    let f = try CacheFixture(compression: "zstd")
    let narinfo = "/\(f.small.hashPart).narinfo"
    var config = TestServer.Config()
    config.faults[narinfo] = [.init(truncate: 100)]
    let server = try TestServer(serving: f.cache, config: config)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [f.publicKey])
    let error = await cacheError { _ = try await client.narInfo(for: f.small) }
    guard case .malformedNarInfo(let e)? = error else {
      Issue.record("expected a malformed narinfo, got \(String(describing: error))")
      return
    }
    #expect(e.source == server.url + narinfo)
  }

  @Test func untrustedKeyIsRefusedUnlessSignaturesAreOff() async throws {
    let f = try CacheFixture(compression: "zstd", keyName: "stranger-1")
    let server = try TestServer(serving: f.cache)
    defer { server.stop() }
    let other = SecretKey(generatingWithName: "ours-1").publicKey.description
    let client = try makeClient([server.url], keys: [other])
    let error = await cacheError { _ = try await client.narInfo(for: f.small) }
    guard case .untrusted(_, let e)? = error else {
      Issue.record("expected untrusted, got \(String(describing: error))")
      return
    }
    #expect(e.signers == ["stranger-1"])
    #expect(error!.description.contains("signed by stranger-1"))
    #expect(error!.description.contains("ours-1"))

    let open = try makeClient([server.url], keys: [other]) { $0.requireSignatures = false }
    let found = try await open.narInfo(for: f.small)
    #expect(found.signer == nil)
    #expect(try await open.narBytes(found) == (try f.nar(f.small)))
  }

  @Test func otherStoreDirIsRefusedAndFallsThrough() async throws {
    let f = try CacheFixture(compression: "zstd")
    let gnu = try TemporaryDirectory("gnu")
    try "StoreDir: /gnu/store\nPriority: 10\n".write(toFile: gnu.sub("nix-cache-info"), atomically: true, encoding: .utf8)
    let wrong = try TestServer(serving: gnu.path)
    defer { wrong.stop() }
    let right = try TestServer(serving: f.cache)
    defer { right.stop() }
    let alone = try makeClient([wrong.url], keys: [f.publicKey])
    let error = await cacheError { _ = try await alone.narInfo(for: f.small) }
    guard case .storeDirMismatch(let sub, "/nix/store", "/gnu/store")? = error else {
      Issue.record("expected a store dir mismatch, got \(String(describing: error))")
      return
    }
    #expect(sub == wrong.url)
    let both = try makeClient([wrong.url, right.url], keys: [f.publicKey])
    #expect(try await both.narInfo(for: f.small).substituter.url == right.url)
    #expect(await both.substituters().map(\.url) == [right.url])
  }

  @Test func unreachableSubstituterFallsThrough() async throws {
    let f = try CacheFixture(compression: "zstd")
    let dead = try TestServer(serving: f.cache)
    dead.stop()  // nothing listens on its port any more
    let good = try TestServer(serving: f.cache)
    defer { good.stop() }
    let client = try makeClient([dead.url, good.url], keys: [f.publicKey]) { $0.maxAttempts = 2 }
    #expect(try await client.narInfo(for: f.small).substituter.url == good.url)
    #expect(try await client.narInfo(for: f.big).substituter.url == good.url)
    let alone = try makeClient([dead.url], keys: [f.publicKey]) { $0.maxAttempts = 2 }
    let error = await cacheError { _ = try await alone.narInfo(for: f.small) }
    guard case .network(let url, _, _, 2)? = error else {
      Issue.record("expected a connection error after 2 attempts, got \(String(describing: error))")
      return
    }
    #expect(url == dead.url + "/nix-cache-info")
  }

  @Test func priorityOrderAndMisses() async throws {
    let f = try CacheFixture(compression: "zstd")
    // A copy of the cache that lacks `small` and claims a better priority.
    let partial = try TemporaryDirectory("partial")
    try FileManager.default.copyItem(atPath: f.cache, toPath: partial.sub("c"))
    try FileManager.default.removeItem(atPath: "\(partial.sub("c"))/\(f.small.hashPart).narinfo")
    try "StoreDir: /nix/store\nPriority: 10\n".write(toFile: partial.sub("c/nix-cache-info"), atomically: true, encoding: .utf8)
    let a = try TestServer(serving: f.cache)  // nix copy writes no Priority: 50
    defer { a.stop() }
    let b = try TestServer(serving: partial.sub("c"))
    defer { b.stop() }
    let client = try makeClient([a.url, b.url], keys: [f.publicKey])
    #expect(await client.substituters().map(\.url) == [b.url, a.url])
    #expect(try await client.narInfo(for: f.big).substituter.url == b.url)
    #expect(try await client.narInfo(for: f.small).substituter.url == a.url)  // b missed
    #expect(b.requests(for: "/\(f.small.hashPart).narinfo").count == 1)
    // ?priority= in the configuration overrides the cache's own.
    let overridden = try makeClient([a.url + "?priority=5", b.url], keys: [f.publicKey])
    #expect(try await overridden.narInfo(for: f.big).substituter.url == a.url)
  }

  @Test func lookupsArePersistedWithTTLs() async throws {
    let f = try CacheFixture(compression: "zstd")
    let server = try TestServer(serving: f.cache)
    defer { server.stop() }
    let state = try TemporaryDirectory("state")
    let missing = try StorePath("/nix/store/00000000000000000000000000000000-missing")
    let hit = "/\(f.small.hashPart).narinfo"
    let miss = "/\(missing.hashPart).narinfo"
    do {
      let client = try makeClient([server.url], keys: [f.publicKey]) { $0.stateDirectory = state.path }
      _ = try await client.narInfo(for: f.small)
      _ = await cacheError { _ = try await client.narInfo(for: missing) }
    }
    #expect(server.requests(for: hit).count == 1)
    #expect(server.requests(for: miss).count == 1)
    // A restarted daemon (a new client on the same state directory) does not ask again.
    let restarted = try makeClient([server.url], keys: [f.publicKey]) { $0.stateDirectory = state.path }
    #expect(try await restarted.narInfo(for: f.small).info.storePath == f.small)
    let again = await cacheError { _ = try await restarted.narInfo(for: missing) }
    guard case .notFound? = again else {
      Issue.record("expected the cached miss, got \(String(describing: again))")
      return
    }
    #expect(server.requests(for: hit).count == 1)
    #expect(server.requests(for: miss).count == 1)
    // Expired entries are asked again.
    let expired = try makeClient([server.url], keys: [f.publicKey]) {
      $0.stateDirectory = state.path
      $0.narinfoCachePositiveTTL = 0
      $0.narinfoCacheNegativeTTL = 0
    }
    _ = try await expired.narInfo(for: f.small)
    _ = await cacheError { _ = try await expired.narInfo(for: missing) }
    #expect(server.requests(for: hit).count == 2)
    #expect(server.requests(for: miss).count == 2)
    // A cached narinfo is re-verified: with another key trusted it is refused, not served.
    let distrusting = try makeClient([server.url], keys: [SecretKey(generatingWithName: "x").publicKey.description]) {
      $0.stateDirectory = state.path
    }
    let error = await cacheError { _ = try await distrusting.narInfo(for: f.small) }
    guard case .untrusted? = error else {
      Issue.record("expected untrusted, got \(String(describing: error))")
      return
    }
  }

  /// A synthetic closure: narinfos with references, signed with our own key.
  @Test func closureFollowsReferences() async throws {
    let tmp = try TemporaryDirectory("closure")
    let key = SecretKey(generatingWithName: "synthetic-1")
    var paths: [StorePath] = []
    for i in 0..<60 {
      paths.append(try StorePath.make(type: "source", hash: NixHash.sha256(Array("p\(i)".utf8)), name: "pkg-\(i)"))
    }
    try "StoreDir: /nix/store\n".write(toFile: tmp.sub("nix-cache-info"), atomically: true, encoding: .utf8)
    for (i, path) in paths.enumerated() {
      // Path i references i+1 and 2i+1 when they exist (a DAG with sharing), and itself.
      let refs = [i + 1, 2 * i + 1].filter { $0 < 50 && $0 != i }.map { paths[$0] } + [path]
      var info = NarInfo(
        storePath: path, url: "nar/x.nar", narHash: NixHash.sha256([UInt8(i)]), narSize: 100, references: refs)
      info.sign(with: key)
      try info.serialized.write(toFile: tmp.sub("\(path.hashPart).narinfo"), atomically: true, encoding: .utf8)
    }
    let server = try TestServer(serving: tmp.path)
    defer { server.stop() }
    let client = try makeClient([server.url], keys: [key.publicKey.description]) { $0.maxConnections = 8 }
    let closure = try await client.closure(of: [paths[0]])
    #expect(Set(closure.keys) == Set(paths[0..<50]))
    // Each narinfo fetched once.
    #expect(server.requests.filter { $0.contains(".narinfo") }.count == 50)
    // Concurrent lookups of one path share one request.
    let fresh = try makeClient([server.url], keys: [key.publicKey.description])
    let target = paths[55]
    let found = await withTaskGroup(of: CachedPathInfo?.self) { group in
      for _ in 0..<20 { group.addTask { try? await fresh.narInfo(for: target) } }
      var found: [CachedPathInfo] = []
      for await f in group { if let f { found.append(f) } }
      return found
    }
    #expect(found.count == 20)
    #expect(server.requests(for: "/\(target.hashPart).narinfo").count == 1)
    // A missing reference fails the closure, naming the path.
    let error = await cacheError { _ = try await client.closure(of: [paths[55], try StorePath("/nix/store/00000000000000000000000000000000-gone")]) }
    guard case .notFound(let p, _)? = error else {
      Issue.record("expected notFound, got \(String(describing: error))")
      return
    }
    #expect(p.hasSuffix("-gone"))
  }
}

@Suite struct ConfigurationTests {
  @Test func nixConfSyntax() throws {
    let files = [
      "/etc/nix/extra.conf": "extra-substituters = https://extra.example\n",
    ]
    let text = """
      # comment
      substituters = https://cache.nixos.org/ https://a.example?priority=10  # trailing comment
      trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
      extra-substituters = file:///srv/cache
      require-sigs = false
      netrc-file = /etc/nix/netrc
      connect-timeout = 7
      stalled-download-timeout = 45
      narinfo-cache-positive-ttl = 100
      narinfo-cache-negative-ttl = 0
      include extra.conf
      !include missing.conf
      sandbox = true

      """
    let settings = try NixConf.parse(text, source: "/etc/nix/nix.conf") { files[$0] }
    #expect(settings["substituters"] == "https://cache.nixos.org/ https://a.example?priority=10")
    #expect(settings["extra-substituters"] == "file:///srv/cache https://extra.example")
    var config = CacheConfiguration()
    try config.apply(nixConf: settings)
    #expect(config.substituters == ["https://cache.nixos.org/", "https://a.example?priority=10", "file:///srv/cache", "https://extra.example"])
    #expect(config.trustedPublicKeys == ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="])
    #expect(config.requireSignatures == false)
    #expect(config.netrcFile == "/etc/nix/netrc")
    #expect(config.connectTimeout == 7)
    #expect(config.stallTimeout == 45)
    #expect(config.narinfoCachePositiveTTL == 100)
    #expect(config.narinfoCacheNegativeTTL == 0)
    #expect(try config.trustedKeys().keys.count == 1)
  }

  @Test func nixConfErrors() {
    #expect(throws: NixConf.ParseError.self) { try NixConf.parse("substituters\n") }
    #expect(throws: NixConf.ParseError.self) { try NixConf.parse("include nowhere.conf\n") }
    #expect(throws: NixConf.ParseError.self) { try NixConf.parse(" = x\n") }
    var config = CacheConfiguration()
    #expect(throws: CacheError.self) { try config.apply(nixConf: ["require-sigs": "maybe"]) }
    #expect(throws: CacheError.self) { try config.apply(nixConf: ["connect-timeout": "soon"]) }
    config.trustedPublicKeys = ["not-a-key"]
    #expect(throws: CacheError.self) { try BinaryCacheClient(configuration: config, logger: quiet) }
    var ftp = CacheConfiguration()
    ftp.substituters = ["ftp://cache.example"]
    #expect(throws: CacheError.self) { try BinaryCacheClient(configuration: ftp, logger: quiet) }
  }
}

/// Thread-safe box for test callbacks.
final class Locked<Value>: @unchecked Sendable {
  private let lock = NSLock()
  private var value: Value
  init(_ value: Value) { self.value = value }
  func withLock<R>(_ body: (inout Value) -> R) -> R {
    lock.lock()
    defer { lock.unlock() }
    return body(&value)
  }
}
