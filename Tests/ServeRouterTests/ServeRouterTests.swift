import BinaryCache
import ChunkStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import NixFormats
import NixServe
import Testing
import TestSupport

/// The serve's routes in process, through HummingbirdTesting's router client: no socket, no
/// process, no upstream. What needs a pull-through or a real Nix client stays in NixServeTests.
@Suite struct ServeRouterTests {
  typealias Batch = NixfsWire.ChunkBatch

  struct Fixture {
    let tmp: TemporaryDirectory
    let store: ChunkStore
    let server: ServeServer
    let manifest: Manifest
  }

  /// A serve whose store holds one ingested path (a tree of three files) and no upstream.
  func fixture() throws -> Fixture {
    let tmp = try TemporaryDirectory("serve-router")
    let nix = NixFixture(in: tmp.path)
    let (sk, _) = try nix.generateKey("serve-1")
    let tree = tmp.sub("tree")
    try Tree.file("\(tree)/big", Tree.bytes(300_000, seed: 3))
    try Tree.file("\(tree)/small", "small\n")
    let nar = try NixFixture.dump(tree)
    let hash = NixHash.sha256(nar)
    let path = try StorePath.addedSource(narHash: hash, name: "router-fixture")
    let store = try ChunkStore(.init(stateDirectory: tmp.sub("state")))
    let ingest = try store.ingest(PathInfo(storePath: path, narHash: hash, narSize: UInt64(nar.count)))
    try nar.withUnsafeBytes { try ingest.feed($0) }
    let manifest = try ingest.commit()
    let logger = Logger(label: "serve-router-test")
    let upstream = try BinaryCacheClient(configuration: CacheConfiguration(), logger: logger)
    let cache = PullThroughCache(store: store, upstream: upstream, logger: logger)
    let key = try SecretKey(parsing: String(contentsOfFile: sk, encoding: .utf8))
    return Fixture(
      tmp: tmp, store: store, server: ServeServer(cache: cache, host: "127.0.0.1", port: 0, indexKey: key, logger: logger),
      manifest: manifest)
  }

  func post(_ client: some TestClientProtocol, _ body: [UInt8]) async throws -> TestResponse {
    try await client.execute(uri: "/\(NixfsWire.chunkBatchRoute)", method: .post, body: ByteBuffer(bytes: body))
  }

  @Test func cacheInfoAnnouncesTheChunkIndex() async throws {
    let fx = try fixture()
    try await Application(router: fx.server.makeRouter()).test(.router) { client in
      let r = try await client.execute(uri: "/nix-cache-info", method: .get)
      #expect(r.status == .ok)
      #expect(String(buffer: r.body).contains("\(NixfsWire.cacheInfoKey): \(NixfsWire.version)"))
    }
  }

  /// Named chunks come back in the order named, absent ones as such, each the stored bytes of
  /// what was asked for.
  @Test func aBatchAnswersEveryNameInOrder() async throws {
    let fx = try fixture()
    let held = fx.manifest.chunks.values.flatMap { $0 }
    #expect(held.count >= 2, "the fixture should have several chunks")
    let unknown = String(repeating: "0", count: 64)
    let names = [held[0].id.hex, unknown, held[1].id.hex]
    try await Application(router: fx.server.makeRouter()).test(.router) { client in
      let r = try await post(client, Batch.request(names))
      #expect(r.status == .ok)
      var parser = Batch.Parser(limit: 1 << 20)
      let frames = try parser.feed(Array(buffer: r.body))
      #expect(parser.pending == 0)
      #expect(frames.map { $0.digest.map { String(format: "%02x", $0) }.joined() } == names)
      #expect(frames[1].encoding == .absent && frames[1].bytes.isEmpty)
      for i in [0, 2] {
        #expect(frames[i].encoding != .absent && !frames[i].bytes.isEmpty)
        #expect(frames[i].size == held[i == 0 ? 0 : 1].size)
      }
    }
  }

  @Test func malformedOrOversizedBatchesAreRefused() async throws {
    let fx = try fixture()
    let hex = String(repeating: "ab", count: 32)
    try await Application(router: fx.server.makeRouter()).test(.router) { client in
      #expect(try await post(client, Array("not a digest\n".utf8)).status == .badRequest)
      #expect(try await post(client, Batch.request(Array(repeating: hex, count: Batch.maxChunks + 1))).status == .badRequest)
      // An empty batch is an empty answer.
      let empty = try await post(client, [])
      #expect(empty.status == .ok && empty.body.readableBytes == 0)
    }
  }
}
