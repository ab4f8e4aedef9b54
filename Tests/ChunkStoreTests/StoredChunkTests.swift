import ChunkStore
import Foundation
import Testing
import TestSupport

/// The chunk endpoint's location cache never outlives GC: a chunk freed by an eviction is gone,
/// not served from a stale location (a hole-punched range reads as zeros).
@Suite struct StoredChunkTests {
  @Test func storedChunksAreForgottenWhenGCFreesThem() throws {
    let tmp = try TemporaryDirectory("stored-chunk")
    try Tree.file(tmp.sub("t/big"), Tree.bytes(600_000, seed: 31))
    let fixture = try NARFixture(tree: tmp.sub("t"), name: "chunky")
    let store = try openStore(tmp.sub("state"))
    let manifest = try ingest(store, fixture)
    let id = try #require(manifest.chunks.values.first?.first?.id)
    func read() throws -> [UInt8]? {
      try store.withStoredChunk(id) { chunk, fill in
        var bytes = [UInt8](repeating: 0, count: chunk.storedSize)
        try bytes.withUnsafeMutableBytes { try fill($0) }
        return bytes
      }
    }
    let first = try #require(try read())
    #expect(try read() == first)  // now from the location cache
    try store.remove(fixture.storePath)
    #expect(try read() == nil)
  }
}
