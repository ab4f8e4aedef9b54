@testable import ChunkStore
import Foundation
import NixFormats
import TestSupport
import Testing

/// Partial paths: registered from a chunk index (here: the manifest of the same NAR ingested in
/// another store, as a serve would send it), filled chunk by chunk, collected, checked, completed.
@Suite struct PartialPathTests {
  /// A tree of every kind with big files and packed small files, ingested in a "serve" store.
  struct Source {
    let tmp: TemporaryDirectory
    let fixture: NARFixture
    let serve: ChunkStore
    let manifest: Manifest
  }

  static func source(_ label: String) throws -> Source {
    let tmp = try TemporaryDirectory(label)
    try Tree.everyKind(at: tmp.sub("tree"), bigFileBytes: 3 << 20)
    for i in 0..<20 { try Tree.file(tmp.sub("tree/small/\(i)"), Tree.bytes(300 + 17 * i, seed: UInt64(i))) }
    let f = try NARFixture(tree: tmp.sub("tree"), name: "partial")
    let serve = try openStore(tmp.sub("serve"))
    try ingest(serve, f)
    let manifest = try #require(try serve.manifest(of: f.storePath))
    return Source(tmp: tmp, fixture: f, serve: serve, manifest: manifest)
  }

  /// Fetches every chunk the node lacks "from the serve": its stored bytes, as the chunk endpoint sends them.
  static func fill(_ node: ChunkStore, from serve: ChunkStore, _ refs: [ChunkRef]) throws {
    for ref in refs {
      let sent = try #require(
        try serve.withStoredChunk(ref.id) { chunk, read -> (Bool, [UInt8]) in
          var bytes = [UInt8](repeating: 0, count: chunk.storedSize)
          try bytes.withUnsafeMutableBytes { try read($0) }
          return (chunk.zstd, bytes)
        })
      try node.accept(ref.id, size: Int(ref.size), zstd: sent.0, bytes: sent.1, source: "test")
    }
  }

  @Test func aPartialPathReadsChunkByChunkAndCompletes() throws {
    let s = try Self.source("partial-read")
    let node = try openStore(s.tmp.sub("node"))
    try node.registerPartial(s.manifest)
    let path = s.fixture.storePath
    #expect(node.isPartial(path) && !node.isComplete(path))
    #expect(try node.servableTree(of: path)?.nodes == s.manifest.nodes)
    #expect(try node.tree(of: path) == nil, "a partial path is not complete")
    // A read of an absent chunk says so; after the chunk came, it reads the right bytes.
    let (content, size) = try #require(s.manifest.contents.first { $0.value > 1 << 20 })
    #expect(throws: ChunkStoreError.self) { try node.read(content: content, offset: 0, count: 100) }
    let needed = try node.absentChunks(content: content, offset: 0, count: 100)
    #expect(needed.count == 1)
    try Self.fill(node, from: s.serve, needed)
    #expect(try node.read(content: content, offset: 0, count: 100) == (try s.serve.read(content: content, offset: 0, count: 100)))
    #expect(try node.absentChunks(content: content, offset: 0, count: Int(size)).count > 0, "only that chunk came")
    // GC and fsck know the state; dumping needs the path complete.
    #expect(try node.fsck(repair: false).isConsistent)
    #expect(throws: ChunkStoreError.self) { try node.dump(path) { _ in } }
    try Self.fill(node, from: s.serve, try node.absentChunks(of: path))
    node.writeArriving()
    #expect(try node.fsck(repair: false).isConsistent)
    try node.completePartial(path)
    #expect(node.isComplete(path))
    #expect(NixHash.sha256(try dump(node, path)) == s.fixture.hash)
    #expect(try node.stats().absentChunks == 0)
  }

  @Test func bytesThatAreNotTheChunkAreRefusedAndNeverReadable() throws {
    let s = try Self.source("partial-refuse")
    let node = try openStore(s.tmp.sub("node"))
    try node.registerPartial(s.manifest)
    let refs = try node.absentChunks(of: s.fixture.storePath)
    let ref = try #require(refs.first { $0.size > 4096 })
    var wrong = [UInt8](repeating: 7, count: Int(ref.size))
    #expect(throws: ChunkStoreError.self) { try node.accept(ref.id, size: Int(ref.size), zstd: false, bytes: wrong, source: "test") }
    wrong.removeLast()
    #expect(throws: ChunkStoreError.self) { try node.accept(ref.id, size: Int(ref.size), zstd: false, bytes: wrong, source: "test") }
    #expect(throws: ChunkStoreError.self) { try node.accept(ref.id, size: Int(ref.size), zstd: true, bytes: wrong, source: "test") }
    #expect(node.absentAmong([ref]) == [ref], "nothing of it was kept")
  }

  @Test func anIndexAtOddsWithItselfOrTheStoreIsRefused() throws {
    let s = try Self.source("partial-odd")
    let node = try openStore(s.tmp.sub("node"))
    // A file whose chunks do not add up to it.
    var short = s.manifest
    let (content, refs) = try #require(short.chunks.first { $0.value.count > 1 && short.slices[$0.key] == nil })
    short.chunks[content] = Array(refs.dropLast())
    #expect(throws: ChunkStoreError.self) { try node.registerPartial(short) }
    // A content named otherwise than its chunks say.
    var renamed = s.manifest
    renamed.chunks[content] = refs.reversed()
    #expect(throws: ChunkStoreError.self) { try node.registerPartial(renamed) }
    #expect(!node.isPartial(s.fixture.storePath))
    #expect(try node.fsck(repair: false).isConsistent, "a refused index leaves nothing behind")
  }

  @Test func gcEvictsPartialPathsAndAWholeIngestFillsTheirChunks() throws {
    let s = try Self.source("partial-gc")
    let node = try openStore(s.tmp.sub("node"))
    try node.registerPartial(s.manifest)
    try Self.fill(node, from: s.serve, Array(try node.absentChunks(of: s.fixture.storePath).prefix(3)))
    node.writeArriving()
    let report = try node.collectGarbage(maxStoredBytes: 0)
    #expect(report.evicted == [s.fixture.storePath.path])
    #expect(try node.stats().chunks == 0 && (try node.stats().absentChunks) == 0)
    #expect(try node.fsck(repair: false).isConsistent)
    // Partial again, then the whole NAR: the absent rows get the ingest's bytes.
    try node.registerPartial(s.manifest)
    try ingest(node, s.fixture)
    #expect(node.isComplete(s.fixture.storePath))
    #expect(try node.stats().absentChunks == 0)
    #expect(try node.fsck(repair: false).isConsistent)
    #expect(NixHash.sha256(try dump(node, s.fixture.storePath)) == s.fixture.hash)
  }
}
