@testable import ChunkStore
import Foundation
import NixFormats
import TestSupport
import Testing

@Suite struct FastCDCTests {
  let cdc = FastCDC(minSize: 2048, avgSize: 8192, maxSize: 32768)

  @Test func chunkSizesStayWithinBoundsAndNearTheAverage() {
    let data = Tree.bytes(4 << 20, seed: 1)
    let lengths = cdc.chunkLengths(data)
    #expect(lengths.reduce(0, +) == data.count)
    #expect(lengths.dropLast().allSatisfy { $0 >= 2048 && $0 <= 32768 })
    let mean = data.count / lengths.count
    #expect(mean > 4096 && mean < 16384, "mean chunk \(mean)")
  }

  @Test func boundariesAreContentDefined() {
    let data = Tree.bytes(2 << 20, seed: 2)
    var edited = data
    edited.insert(contentsOf: Array("inserted near the start".utf8), at: 1000)
    func chunks(_ d: [UInt8]) -> [ArraySlice<UInt8>] {
      var out: [ArraySlice<UInt8>] = []
      var s = 0
      for l in cdc.chunkLengths(d) {
        out.append(d[s..<s + l])
        s += l
      }
      return out
    }
    let a = chunks(data)
    let b = Set(chunks(edited).map { Array($0) })
    let shared = a.filter { b.contains(Array($0)) }.count
    // Only the chunks around the insertion may differ.
    #expect(shared >= a.count - 2, "\(shared) of \(a.count) chunks survived an insertion")
  }

  @Test func resultDoesNotDependOnHowInputIsSplit() throws {
    let dir = try TemporaryDirectory("cdc-split")
    try Tree.file(dir.sub("tree/a"), Tree.bytes(900_000, seed: 3))
    try Tree.file(dir.sub("tree/b"), "small")
    let f = try NARFixture(tree: dir.sub("tree"), name: "split")
    let one = try openStore(dir.sub("s1"))
    let two = try openStore(dir.sub("s2"))
    let m1 = try ingest(one, f, pieces: 1 << 30)
    let m2 = try ingest(two, f, pieces: 977)
    #expect(m1 == m2)
    #expect((m1.chunks.values.map(\.count).max() ?? 0) > 3)
  }
}

@Suite struct RoundTripTests {
  @Test func everyKindRoundTripsAndServesTheFilesystemAPI() throws {
    let dir = try TemporaryDirectory("roundtrip")
    try Tree.everyKind(at: dir.sub("tree"), bigFileBytes: 3 << 20)
    let fixture = NixFixture(in: dir.path)
    let realPath = try fixture.add(dir.sub("tree"))
    let f = try NARFixture(tree: dir.sub("tree"), name: "tree")
    // The NAR of the real store path is the NAR we ingest, under the path Nix gave it.
    #expect(try NixFixture.dump(fixture.store + realPath) == f.nar)
    #expect(f.storePath.path == realPath)

    let store = try openStore(dir.sub("state"))
    #expect(!store.isComplete(f.storePath))
    let m = try ingest(store, f)
    #expect(store.isComplete(f.storePath))
    #expect(store.completePaths() == [f.storePath])
    #expect(try dump(store, f.storePath) == f.nar)

    // Tree API: lookups, kinds, sorted children, identical files share a content ID.
    let tool = try #require(m.lookup(path: "bin/tool"))
    guard case .regular(let toolContent, let toolSize, true) = m.nodes[tool].kind else {
      Issue.record("bin/tool is not an executable file")
      return
    }
    #expect(try store.read(content: toolContent, offset: 0, count: 100) == Array("#!/bin/sh\necho tool\n".utf8))
    #expect(toolSize == 20)
    let link = try #require(m.lookup(path: "link-to-dir"))
    #expect(m.nodes[link].kind == .symlink(target: Array("bin".utf8)))
    #expect(m.lookup(path: "does-not-exist") == nil)
    let order = try #require(m.lookup(path: "order"))
    let names = m.children(of: order).map { String(decoding: m.nodes[$0].name, as: UTF8.self) }
    #expect(names == ["-", "0", "B", "Z", "_", "a", "a-b", "a.b", "ab", "z"])
    #expect(m.children(of: order).allSatisfy { Int(m.nodes[$0].parent) == order })
    guard case .regular(let e1, 0, false) = m.nodes[try #require(m.lookup(path: "empty"))].kind,
      case .regular(let e2, 0, true) = m.nodes[try #require(m.lookup(path: "bin/empty-exec"))].kind
    else {
      Issue.record("empty files")
      return
    }
    #expect(e1 == e2)
    #expect(try store.read(content: e1, offset: 0, count: 10) == [])

    // Reads across chunk boundaries match the file.
    let bigBytes = Tree.bytes((3 << 20) + 3, seed: 42)
    guard case .regular(let big, let bigSize, _) = m.nodes[try #require(m.lookup(path: "big.bin"))].kind else {
      Issue.record("big.bin")
      return
    }
    #expect(bigSize == UInt64(bigBytes.count))
    #expect((m.chunks[big]?.count ?? 0) > 5)
    var rng = SystemRandomNumberGenerator()
    for _ in 0..<200 {
      let off = Int.random(in: 0..<bigBytes.count, using: &rng)
      let n = Int.random(in: 0...300_000, using: &rng)
      let got = try store.read(content: big, offset: UInt64(off), count: n)
      #expect(got[...] == bigBytes[off..<min(bigBytes.count, off + n)])
    }
    #expect(try store.read(content: big, offset: bigSize, count: 5) == [])
    #expect(throws: ChunkStoreError.self) { try store.read(content: big, offset: bigSize + 1, count: 5) }

    // The manifest is self-contained and serialisable.
    let full = try #require(try store.manifest(of: f.storePath))
    let json = try JSONEncoder().encode(full)
    let back = try JSONDecoder().decode(Manifest.self, from: json)
    #expect(back == full)
    #expect(back.info.narHash == f.hash)
    #expect(full.chunks[big]?.reduce(0) { $0 + UInt64($1.size) } == bigSize)
    // Small files are packed into shared chunks: one chunk each, holding them at their slice.
    #expect(full.slices[toolContent] != nil)
    #expect(full.slices[big] == nil)
    // Rebuilding the NAR from the decoded manifest + chunk reads gives the same bytes.
    var writer = NARWriter()
    try back.replay({ try writer.write($0) }) { content, size, emit in
      if let skip = back.slices[content] {
        let refs = back.chunks[content] ?? []
        #expect(refs.count == 1 && UInt64(skip) + size <= UInt64(refs.first?.size ?? 0))
        let bytes = try store.read(content: content, offset: 0, count: Int(size))
        #expect(ContentID.of(bytes) == content)
        try bytes.withUnsafeBytes { try emit($0) }
        return
      }
      var off: UInt64 = 0
      for ref in back.chunks[content] ?? [] {
        let bytes = try store.read(content: content, offset: off, count: Int(ref.size))
        #expect(ChunkID.of(bytes) == ref.id)
        try bytes.withUnsafeBytes { try emit($0) }
        off += UInt64(ref.size)
      }
    }
    #expect(writer.take() == f.nar)
    #expect(try store.fsck(repair: false).isConsistent)
  }

  @Test func badHashSizeOrArchiveLeavesNoTrace() throws {
    let dir = try TemporaryDirectory("badhash")
    try mixedTree(at: dir.sub("tree"), seed: 5)
    let f = try NARFixture(tree: dir.sub("tree"), name: "bad")
    let store = try openStore(dir.sub("state"))
    var wrong = f.info
    wrong.narHash = NixHash.sha256([1, 2, 3])
    let ing = try store.ingest(wrong)
    try ing.feed(f.nar)
    #expect(throws: ChunkStoreError.self) { try ing.commit() }
    #expect(!store.isComplete(f.storePath))

    var short = f.info
    short.narSize -= 8
    let ing2 = try store.ingest(short)
    #expect(throws: ChunkStoreError.self) { try ing2.feed(f.nar) }
    ing2.abort()

    // Truncated NAR.
    let ing3 = try store.ingest(f.info)
    try ing3.feed(Array(f.nar.prefix(f.nar.count / 2)))
    #expect(throws: ChunkStoreError.self) { try ing3.commit() }

    // Dropped without commit.
    do {
      let ing4 = try store.ingest(f.info)
      try ing4.feed(Array(f.nar.prefix(f.nar.count - 100)))
    }
    let stats = try store.stats()
    #expect(stats.paths == 0 && stats.chunks == 0 && stats.storedBytes == 0)
    #expect(try store.fsck(repair: false).isConsistent)
    // Nothing is left behind in the packs either (the uncommitted tail was cut).
    var packBytes = 0
    for p in try FileManager.default.contentsOfDirectory(atPath: dir.sub("state/packs")) {
      packBytes += (try FileManager.default.attributesOfItem(atPath: dir.sub("state/packs/\(p)"))[.size] as? Int) ?? 0
    }
    #expect(packBytes == 0)
    // And the real thing still goes in.
    try ingest(store, f)
    #expect(try dump(store, f.storePath) == f.nar)
  }

  @Test func rootMayBeAFileOrASymlink() throws {
    let dir = try TemporaryDirectory("roots")
    try Tree.file(dir.sub("script"), "#!/bin/sh\nexit 0\n", executable: true)
    try Tree.file(dir.sub("blob"), Tree.bytes(300_000, seed: 17))
    try Tree.symlink(dir.sub("link"), to: "/nix/store/somewhere")
    let store = try openStore(dir.sub("state"))
    for name in ["script", "blob", "link"] {
      let f = try NARFixture(tree: dir.sub(name), name: name)
      let m = try ingest(store, f)
      #expect(m.nodes.count == 1)
      #expect(try dump(store, f.storePath) == f.nar)
    }
    #expect(try store.fsck(repair: false).isConsistent)
  }

  @Test func resetRestartsTheStream() throws {
    let dir = try TemporaryDirectory("reset")
    try mixedTree(at: dir.sub("tree"), seed: 13, files: 12, big: 700_000)
    let f = try NARFixture(tree: dir.sub("tree"), name: "reset")
    let store = try openStore(dir.sub("state"))
    let ing = try store.ingest(f.info)
    try ing.feed(Array(f.nar.prefix(f.nar.count * 2 / 3)))
    try ing.reset()
    try f.nar.withUnsafeBytes { try ing.write($0) }
    try ing.commit()
    #expect(try dump(store, f.storePath) == f.nar)
    #expect(try store.fsck(repair: false).isConsistent)
  }

  @Test func secondWriterIsRefusedAndReadOnlyOpenWorks() throws {
    let dir = try TemporaryDirectory("lock")
    try mixedTree(at: dir.sub("tree"), seed: 6, files: 6, big: 100_000)
    let f = try NARFixture(tree: dir.sub("tree"), name: "locked")
    let store = try openStore(dir.sub("state"))
    try ingest(store, f)
    #expect(throws: ChunkStoreError.locked(stateDir: dir.sub("state"))) { try openStore(dir.sub("state")) }
    let reader = try ChunkStore(.init(stateDirectory: dir.sub("state"), readOnly: true))
    #expect(try dump(reader, f.storePath) == f.nar)
    #expect(throws: ChunkStoreError.alreadyComplete(storePath: f.storePath.path)) { try store.ingest(f.info) }
  }
}

@Suite struct DedupTests {
  @Test func identicalFilesAcrossPathsAreStoredOnce() throws {
    let dir = try TemporaryDirectory("dedup-same")
    let big = Tree.bytes(6 << 20, seed: 9)
    try Tree.file(dir.sub("a/lib/big.so"), big)
    try Tree.file(dir.sub("a/readme"), "version a\n")
    try Tree.file(dir.sub("b/share/copy-of-big"), big, executable: true)
    try Tree.file(dir.sub("b/readme"), "version b\n")
    let a = try NARFixture(tree: dir.sub("a"), name: "a")
    let b = try NARFixture(tree: dir.sub("b"), name: "b")
    let store = try openStore(dir.sub("state"))
    let ma = try ingest(store, a)
    let one = try store.stats().storedBytes
    let mb = try ingest(store, b)
    let two = try store.stats().storedBytes
    guard case .regular(let ca, _, false) = ma.nodes[try #require(ma.lookup(path: "lib/big.so"))].kind,
      case .regular(let cb, _, true) = mb.nodes[try #require(mb.lookup(path: "share/copy-of-big"))].kind
    else {
      Issue.record("kinds")
      return
    }
    #expect(ca == cb, "identical files get one content ID (one inode)")
    #expect(two - one < 4096, "second copy cost \(two - one) bytes")
    let s = try store.stats()
    print("dedup, same large file in two paths: logical \(s.logicalBytes), stored \(s.storedBytes), dedup ratio \(s.dedupRatio)")
    #expect(s.dedupRatio > 1.9)
    #expect(try dump(store, b.storePath) == b.nar)
  }

  @Test func twoVersionsDifferingByAFewPercentShareMostChunks() throws {
    let dir = try TemporaryDirectory("dedup-versions")
    try mixedTree(at: dir.sub("v1"), seed: 11, files: 40, big: 8 << 20)
    try mixedTree(at: dir.sub("v2"), seed: 11, files: 40, big: 8 << 20)
    // v2: a few edits inside the big file (insertions and overwrites), one changed small file.
    var big = Tree.bytes(8 << 20, seed: 11 &* 31 &+ 1)
    for k in 0..<6 {
      let at = (k * 1_300_007) % big.count
      if k % 2 == 0 {
        big.insert(contentsOf: Tree.bytes(3000, seed: UInt64(100 + k)), at: at)
      } else {
        big.replaceSubrange(at..<at + 5000, with: Tree.bytes(5000, seed: UInt64(200 + k)))
      }
    }
    try Tree.file(dir.sub("v2/big"), big)
    try Tree.file(dir.sub("v2/d0/f0"), "changed")
    let v1 = try NARFixture(tree: dir.sub("v1"), name: "pkg-1.0")
    let v2 = try NARFixture(tree: dir.sub("v2"), name: "pkg-1.1")
    let store = try openStore(dir.sub("state"))
    try ingest(store, v1)
    let one = try store.stats().chunkBytes
    try ingest(store, v2)
    let both = try store.stats()
    let ratio = Double(both.chunkBytes) / Double(one)
    print("dedup, two versions: v1 \(one) unique bytes, v1+v2 \(both.chunkBytes) (\(ratio)x), dedup ratio \(both.dedupRatio)")
    #expect(ratio < 1.25, "two versions cost \(ratio)x one")
    #expect(try dump(store, v1.storePath) == v1.nar)
    #expect(try dump(store, v2.storePath) == v2.nar)
  }
}

@Suite struct PackedSmallFileTests {
  /// 300 small files (up to the 4 KiB limit) in one path: packed into a few shared chunks, each
  /// file still its own content; a second path with the same files plus one new one stores only
  /// the group holding the new one, and keeps reading the first path's groups after it is gone.
  @Test func smallFilesArePackedSharedAndCheckedByFsck() throws {
    let dir = try TemporaryDirectory("packed")
    var smallBytes = 0
    for i in 0..<300 {
      let size = 1 + (i * 977) % 4096
      smallBytes += size
      try Tree.file(dir.sub("a/d\(i % 7)/f\(i)"), Tree.bytes(size, seed: UInt64(400 + i)))
      try Tree.file(dir.sub("b/d\(i % 7)/f\(i)"), Tree.bytes(size, seed: UInt64(400 + i)))
    }
    // Repeats inside one path are packed once.
    try Tree.file(dir.sub("a/again"), Tree.bytes(1 + 977 % 4096, seed: 401))
    try Tree.file(dir.sub("b/new"), Tree.bytes(3000, seed: 999))
    let a = try NARFixture(tree: dir.sub("a"), name: "small-a")
    let b = try NARFixture(tree: dir.sub("b"), name: "small-b")
    let store = try openStore(dir.sub("state"))
    let ma = try ingest(store, a)
    let one = try store.stats()
    #expect(one.contents == 300)
    #expect(one.chunks < 300 / 5, "\(one.chunks) chunks for 300 small files")
    #expect(ma.slices.count == 300)
    #expect(one.chunkBytes == UInt64(smallBytes), "a repeated file is packed once")
    let again = try #require(ma.lookup(path: "again"))
    let first = try #require(ma.lookup(path: "d1/f1"))
    #expect(ma.nodes[again].kind == ma.nodes[first].kind)

    let mb = try ingest(store, b)
    let two = try store.stats()
    // Only the group holding the new file is new (16 to 20 KiB); the rest were all known.
    #expect(two.chunkBytes - one.chunkBytes < 24 << 10, "second path added \(two.chunkBytes - one.chunkBytes) bytes")
    #expect(two.contents == 301)
    #expect(try store.fsck(repair: false).isConsistent)
    // What ingest returns is the manifest as stored: known files in the first path's groups.
    #expect(try mb == store.manifest(of: b.storePath))
    #expect(try ma == store.manifest(of: a.storePath))
    // The second path reads its known files from the first path's groups, also once it is gone.
    try store.remove(a.storePath)
    #expect(try dump(store, b.storePath) == b.nar)
    let f7 = try #require(mb.lookup(path: "d0/f7"))
    guard case .regular(let c7, let size7, _) = mb.nodes[f7].kind else {
      Issue.record("d0/f7")
      return
    }
    #expect(try store.read(content: c7, offset: 10, count: 100) == Array(Tree.bytes(Int(size7), seed: 407)[10..<110]))
    #expect(try store.fsck(repair: false).isConsistent)

    // A packed file's slice pointing at the wrong bytes is caught, and repair marks its path
    // incomplete (to be fetched again).
    try store.withWriter { db in try db.exec("UPDATE contents SET skip = skip + 1 WHERE skip > 0") }
    store.dropLayouts()
    let report = try store.fsck(repair: false)
    #expect(!report.isConsistent)
    #expect(report.problems.contains { $0.contains("do not match its digest") }, "\(report.problems.prefix(3))")
    let repaired = try store.fsck(repair: true)
    #expect(repaired.isConsistent, "\(repaired.problems.prefix(3))")
    #expect(store.incompletePaths() == [b.storePath.path])
  }
}

extension PackedSmallFileTests {
  /// A path of one small file: its group is that file alone, stored like any one-chunk file (no
  /// slice). A second path packs it with a new neighbour, yet names the first path's chunk for
  /// it: what ingest returns is what the store holds.
  @Test func aLoneSmallFileIsItsWholeChunk() throws {
    let dir = try TemporaryDirectory("lone")
    try Tree.file(dir.sub("a/only"), Tree.bytes(1000, seed: 7))
    try Tree.file(dir.sub("b/only"), Tree.bytes(1000, seed: 7))
    try Tree.file(dir.sub("b/other"), Tree.bytes(2000, seed: 8))
    let a = try NARFixture(tree: dir.sub("a"), name: "lone-a")
    let b = try NARFixture(tree: dir.sub("b"), name: "lone-b")
    let store = try openStore(dir.sub("state"))
    let ma = try ingest(store, a)
    #expect(ma.slices.isEmpty)
    #expect(try ma == store.manifest(of: a.storePath))
    let mb = try ingest(store, b)
    #expect(mb.slices.count == 1, "only other is a slice of b's group")
    #expect(try mb == store.manifest(of: b.storePath))
    #expect(try store.fsck(repair: false).isConsistent)
    #expect(try dump(store, b.storePath) == b.nar)
  }

  /// Two ingests in flight at once with the same small files: the second to commit finds every
  /// file already there, drops its own shared chunks and points at the first one's.
  @Test func concurrentIngestsOfTheSameSmallFiles() throws {
    let dir = try TemporaryDirectory("packed-race")
    for i in 0..<100 {
      let bytes = Tree.bytes(100 + i * 37, seed: UInt64(700 + i))
      try Tree.file(dir.sub("a/f\(i)"), bytes)
      // In the other order, so b's shared chunks differ from a's.
      try Tree.file(dir.sub("b/g\(99 - i)"), bytes)
    }
    let a = try NARFixture(tree: dir.sub("a"), name: "race-a")
    let b = try NARFixture(tree: dir.sub("b"), name: "race-b")
    let store = try openStore(dir.sub("state"))
    let ia = try store.ingest(a.info)
    let ib = try store.ingest(b.info)
    try ia.feed(a.nar)
    try ib.feed(b.nar)
    try ia.commit()
    let one = try store.stats()
    try ib.commit()
    let two = try store.stats()
    #expect(two.chunks == one.chunks && two.storedBytes == one.storedBytes)
    #expect(two.contents == 100)
    #expect(try store.fsck(repair: false).isConsistent)
    try store.remove(a.storePath)
    #expect(try dump(store, b.storePath) == b.nar)
    #expect(try store.fsck(repair: false).isConsistent)
  }

  /// A store written by a newer nixfs (higher schema version) is refused, not misread.
  @Test func aNewerSchemaIsRefused() throws {
    let dir = try TemporaryDirectory("newer")
    do {
      let store = try openStore(dir.sub("state"))
      try store.withWriter { db in try db.exec("PRAGMA user_version = 3") }
    }
    #expect(throws: ChunkStoreError.self) { try openStore(dir.sub("state")) }
    #expect(throws: ChunkStoreError.self) { try ChunkStore(.init(stateDirectory: dir.sub("state"), readOnly: true)) }
  }

  /// An index from before packing (no `contents.skip`) is migrated when a writer opens it.
  @Test func anIndexWithoutSkipIsMigratedOnOpen() throws {
    let dir = try TemporaryDirectory("migrate")
    try Tree.file(dir.sub("old/lib.so"), Tree.bytes(100_000, seed: 81))
    try Tree.file(dir.sub("new/tiny"), "tiny\n")
    let old = try NARFixture(tree: dir.sub("old"), name: "old")
    let new = try NARFixture(tree: dir.sub("new"), name: "new")
    do {
      let store = try openStore(dir.sub("state"))
      try ingest(store, old)
      try store.withWriter { db in
        try db.exec("ALTER TABLE contents DROP COLUMN skip")
        try db.exec("PRAGMA user_version = 0")
      }
    }
    // Read-only (e.g. `nixfs dump` beside an older daemon) works before any writer migrated it.
    do {
      let reader = try ChunkStore(.init(stateDirectory: dir.sub("state"), readOnly: true))
      #expect(try dump(reader, old.storePath) == old.nar)
    }
    let store = try openStore(dir.sub("state"))
    // Migrated, and marked as holding contents from before (their names are not checked).
    #expect(try store.withWriter { db in try ChunkStore.schemaFacts(db, store.indexPath).version } == 1)
    #expect(try dump(store, old.storePath) == old.nar)
    try ingest(store, new)
    #expect(try dump(store, new.storePath) == new.nar)
    #expect(try store.fsck(repair: false).isConsistent)
  }
}

@Suite struct ContentNameTests {
  /// A file of several chunks is named by its chunk list (a receiver checks the name from the
  /// manifest alone), one of a single chunk by its SHA-256; fsck catches rows that point at other
  /// chunks (reordered, or another file's chunk) even though every offset and size still adds up.
  @Test func multiChunkContentsAreNamedByTheirChunkList() throws {
    let dir = try TemporaryDirectory("names")
    let bigBytes = Tree.bytes(2 << 20, seed: 91)
    try Tree.file(dir.sub("t/big"), bigBytes)
    try Tree.file(dir.sub("t/one"), Tree.bytes(10_000, seed: 92))
    try Tree.file(dir.sub("t/two"), Tree.bytes(10_000, seed: 93))
    let f = try NARFixture(tree: dir.sub("t"), name: "names")
    let store = try openStore(dir.sub("state"))
    let m = try ingest(store, f)
    let full = try #require(try store.manifest(of: f.storePath))
    guard case .regular(let big, _, _) = m.nodes[try #require(m.lookup(path: "big"))].kind,
      case .regular(let one, _, _) = m.nodes[try #require(m.lookup(path: "one"))].kind
    else {
      Issue.record("kinds")
      return
    }
    let list = try #require(full.chunks[big])
    #expect(list.count > 3)
    #expect(ContentID.ofChunkList(list) == big)
    #expect(big != ContentID.of(bigBytes))
    #expect(one == ContentID.of(Tree.bytes(10_000, seed: 92)))
    #expect(try store.fsck(repair: false).isConsistent)

    // Swap the first two chunks of big, with offsets rewritten so the list still covers its size;
    // and point one at two's chunk, of the same size.
    try store.withWriter { db in
      func row(_ id: ContentID) throws -> Int64 {
        let c = try db.prepare("SELECT id FROM contents WHERE digest = ?").bind(id)
        try #require(try c.step(), "no content \(id)")
        return c.int(0)
      }
      let bigRow = try row(big)
      let rows = try db.prepare("SELECT chunk FROM content_chunks WHERE content = ? ORDER BY offset LIMIT 2").bind(bigRow)
      var chunks: [Int64] = []
      while try rows.step() { chunks.append(rows.int(0)) }
      try db.exec("DELETE FROM content_chunks WHERE content = \(bigRow) AND offset < \(list[0].size + list[1].size)")
      try db.exec("INSERT INTO content_chunks VALUES(\(bigRow), 0, \(chunks[1])), (\(bigRow), \(list[1].size), \(chunks[0]))")
      let two = try row(ContentID.of(Tree.bytes(10_000, seed: 93)))
      try db.exec("UPDATE content_chunks SET chunk = (SELECT chunk FROM content_chunks WHERE content = \(two)) WHERE content = \(try row(one))")
    }
    store.dropLayouts()
    let report = try store.fsck(repair: false)
    #expect(report.problems.contains { $0.contains("\(big): its chunk list does not hash to its name") }, "\(report.problems)")
    #expect(report.problems.contains { $0.contains("\(one): its chunk's digest is not its name") }, "\(report.problems)")
    let repaired = try store.fsck(repair: true)
    #expect(repaired.isConsistent, "\(repaired.problems)")
    #expect(store.incompletePaths() == [f.storePath.path])
  }
}

@Suite struct GCAndFsckTests {
  @Test func gcEvictsLeastRecentlyUsedUnpinnedPathsAndKeepsSharedChunks() throws {
    let dir = try TemporaryDirectory("gc")
    let shared = Tree.bytes(2 << 20, seed: 21)
    var fixtures: [NARFixture] = []
    for i in 0..<4 {
      try Tree.file(dir.sub("t\(i)/shared"), shared)
      try Tree.file(dir.sub("t\(i)/own"), Tree.bytes(1 << 20, seed: UInt64(30 + 2 * i)))
      fixtures.append(try NARFixture(tree: dir.sub("t\(i)"), name: "p\(i)"))
    }
    let store = try openStore(dir.sub("state"))
    for f in fixtures { try ingest(store, f) }
    // LRU order: p1 oldest, then p2; p0 and p3 recently used; p1 pinned by a volume.
    Thread.sleep(forTimeInterval: 1.1)
    store.touch(fixtures[0].storePath)
    store.touch(fixtures[3].storePath)
    try store.pin(fixtures[1].storePath, holder: "volume-1")
    let total = try store.stats().storedBytes
    // Room for about everything but one path's own file.
    let r = try store.collectGarbage(maxStoredBytes: total - (1 << 19))
    #expect(r.evicted == [fixtures[2].storePath.path])
    #expect(!store.isComplete(fixtures[2].storePath))
    for i in [0, 1, 3] { #expect(try dump(store, fixtures[i].storePath) == fixtures[i].nar) }
    // The writer's running total agrees with a recount.
    #expect(try store.storedBytes() == store.stats().storedBytes)
    #expect(try store.fsck(repair: false).isConsistent)
    // Down to nothing: the pinned path survives, with the shared file.
    try store.collectGarbage(maxStoredBytes: 0)
    #expect(store.completePaths() == [fixtures[1].storePath])
    #expect(try dump(store, fixtures[1].storePath) == fixtures[1].nar)
    try store.unpin(fixtures[1].storePath, holder: "volume-1")
    try store.collectGarbage(maxStoredBytes: 0)
    let s = try store.stats()
    #expect(s.paths == 0 && s.chunks == 0 && s.contents == 0)
    #expect(try store.fsck(repair: false).isConsistent)
  }

  @Test func onlineBudgetIsEnforcedAfterCommits() throws {
    let dir = try TemporaryDirectory("budget")
    let store = try openStore(dir.sub("state"), maxStored: 3 << 20)
    var last: NARFixture?
    for i in 0..<4 {
      try Tree.file(dir.sub("t\(i)/f"), Tree.bytes(1 << 20, seed: UInt64(50 + 2 * i)))
      let f = try NARFixture(tree: dir.sub("t\(i)"), name: "b\(i)")
      try ingest(store, f)
      last = f
      #expect(try store.stats().storedBytes <= 3 << 20)
    }
    #expect(store.isComplete(try #require(last).storePath))
    #expect(store.completePaths().count < 4)
  }

  @Test func fsckFindsCorruptionAndRepairMarksPathsIncomplete() throws {
    let dir = try TemporaryDirectory("fsck")
    try Tree.file(dir.sub("a/big"), Tree.bytes(1 << 20, seed: 61))
    try Tree.file(dir.sub("a/small"), "tiny")
    try Tree.file(dir.sub("b/other"), Tree.bytes(1 << 20, seed: 62))
    let a = try NARFixture(tree: dir.sub("a"), name: "a")
    let b = try NARFixture(tree: dir.sub("b"), name: "b")
    do {
      let store = try openStore(dir.sub("state"))
      try ingest(store, a)
      try ingest(store, b)
      #expect(try store.fsck(repair: false).isConsistent)
    }
    // Flip a byte in the middle of the first pack: it belongs to path a (ingested first).
    let pack = dir.sub("state/packs/00000001.pack")
    let fd = open(pack, O_RDWR)
    var byte: UInt8 = 0
    _ = pread(fd, &byte, 1, 300_000)
    byte ^= 0xff
    _ = pwrite(fd, &byte, 1, 300_000)
    close(fd)
    let store = try openStore(dir.sub("state"))
    let report = try store.fsck(repair: false)
    #expect(!report.isConsistent)
    #expect(report.problems.contains { $0.contains("does not match its digest") })
    let repaired = try store.fsck(repair: true)
    #expect(repaired.isConsistent, "\(repaired.problems)")
    #expect(!store.isComplete(a.storePath))
    #expect(store.incompletePaths() == [a.storePath.path])
    #expect(try dump(store, b.storePath) == b.nar)
    // Fetching it again makes it whole.
    try ingest(store, a)
    #expect(try dump(store, a.storePath) == a.nar)
    #expect(try store.fsck(repair: false).isConsistent)
    #expect(store.incompletePaths().isEmpty)
  }

  @Test func cliFsckAndStatsExitStatus() throws {
    guard let bin = nixfsBinary() else {
      Issue.record("nixfs binary not found next to the tests; build with --build-tests")
      return
    }
    let dir = try TemporaryDirectory("cli")
    try mixedTree(at: dir.sub("tree"), seed: 71, files: 10, big: 300_000)
    let f = try NARFixture(tree: dir.sub("tree"), name: "cli")
    let nar = dir.sub("x.nar")
    _ = FileManager.default.createFile(atPath: nar, contents: Data(f.nar))
    let state = dir.sub("state")
    try run([bin, "ingest", "--state-dir", state, "--store-path", f.storePath.path, "--nar-hash", f.hash.nix32, nar])
    #expect(try run([bin, "dump", "--state-dir", state, f.storePath.path]).stdout == f.nar)
    #expect(try run([bin, "fsck", "--state-dir", state]).status == 0)
    #expect(try run([bin, "stats", "--state-dir", state]).text.contains("paths:             1 complete"))
    let bad = try run(
      [bin, "ingest", "--state-dir", state, "--store-path", f.storePath.path.replacingOccurrences(of: "-cli", with: "-clj"),
       "--nar-hash", NixHash.sha256([0]).nix32, nar], check: false)
    #expect(bad.status == 1)
    #expect(bad.stderr.contains("NAR hash mismatch"))
    // Corrupt a pack byte: fsck must now fail.
    let pack = dir.sub("state/packs/00000001.pack")
    let fd = open(pack, O_RDWR)
    var byte: UInt8 = 0
    _ = pread(fd, &byte, 1, 100)
    byte ^= 0x55
    _ = pwrite(fd, &byte, 1, 100)
    close(fd)
    #expect(try run([bin, "fsck", "--state-dir", state], check: false).status == 1)
    #expect(try run([bin, "fsck", "--state-dir", state, "--repair"], check: false).status == 0)
  }
}
