import Foundation
import NixFormats
import Testing
import TestSupport

/// Parses `nar` fed in pieces of `pieceSize` and re-encodes every event with the writer.
func roundTrip(_ nar: [UInt8], pieceSize: Int) throws -> (bytes: [UInt8], events: Int, maxData: Int) {
  var reader = NARReader()
  var writer = NARWriter()
  var out: [UInt8] = []
  var events = 0
  var maxData = 0
  var i = 0
  while i < nar.count {
    let end = min(nar.count, i + pieceSize)
    try nar[i..<end].withUnsafeBytes { piece in
      try reader.feed(piece) { event in
        events += 1
        if case .data(let d) = event { maxData = max(maxData, d.count) }
        try writer.write(event)
      }
    }
    out += writer.take()
    i = end
  }
  try reader.finish()
  #expect(writer.isComplete)
  return (out, events, maxData)
}

@Suite struct NARTests {
  struct Fixture: Sendable {
    let tmp: TemporaryDirectory
    let tree: String
    let nar: [UInt8]
  }
  static let once = OnceFixture {
    let tmp = try TemporaryDirectory("nar", forProcess: true)
    let tree = tmp.sub("tree")
    try Tree.everyKind(at: tree)
    return Fixture(tmp: tmp, tree: tree, nar: try NixFixture.dump(tree))
  }

  /// A small archive of every node kind, for exhaustive truncation.
  static let onceSmall = OnceFixture {
    let tmp = try TemporaryDirectory("nar-small", forProcess: true)
    let tree = tmp.sub("t")
    try Tree.file("\(tree)/a", "abc")
    try Tree.file("\(tree)/b/x", "12345678", executable: true)
    try Tree.symlink("\(tree)/c", to: "b")
    try Tree.directory("\(tree)/d")
    try Tree.file("\(tree)/e", [])
    return try NixFixture.dump(tree)
  }

  let fixture: Fixture
  let small: [UInt8]
  init() throws {
    fixture = try Self.once.get()
    small = try Self.onceSmall.get()
  }

  @Test(arguments: [1, 3, 8, 13, 4096, 1 << 20, Int.max])
  func readerThenWriterReproducesNixDump(pieceSize: Int) throws {
    let nar = fixture.nar
    let size = pieceSize == Int.max ? nar.count : pieceSize
    if size < 8 && nar.count > 1 << 20 {
      // Byte-at-a-time over 24 MiB is slow in debug builds; the small tree covers it exhaustively.
      let (bytes, _, maxData) = try roundTrip(small, pieceSize: size)
      #expect(bytes == small)
      #expect(maxData <= size)
      return
    }
    let (bytes, events, maxData) = try roundTrip(nar, pieceSize: size)
    #expect(bytes == nar)
    #expect(events > 50)
    // Content is handed through in pieces no larger than what was fed: nothing is buffered.
    #expect(maxData <= size)
  }

  @Test func eventsDescribeTheTree() throws {
    var files: [String: (UInt64, Bool, UInt64)] = [:]
    var links: [String: String] = [:]
    var dirs: Set<String> = []
    var stack: [String] = []
    var dataBytes: UInt64 = 0
    try NARReader.parse(fixture.nar) { event in
      func full(_ n: [UInt8]) -> String {
        (stack + (n.isEmpty ? [] : [String(decoding: n, as: UTF8.self)])).joined(separator: "/")
      }
      switch event {
      case .directory(let n):
        dirs.insert(full(n))
        if !n.isEmpty { stack.append(String(decoding: n, as: UTF8.self)) }
      case .endDirectory: if !stack.isEmpty { stack.removeLast() }
      case .file(let n, let size, let x, let off): files[full(n)] = (size, x, off)
      case .symlink(let n, let t): links[full(n)] = String(decoding: t, as: UTF8.self)
      case .data(let d): dataBytes += UInt64(d.count)
      case .endFile: break
      }
    }
    #expect(files["bin/tool"]?.1 == true)
    #expect(files["hello.txt"]?.1 == false)
    #expect(files["empty"]?.0 == 0)
    #expect(files["big.bin"]?.0 == UInt64(24 << 20) + 3)
    #expect(links["absolute"] == "/etc/hostname")
    #expect(links["dotdot"] == "../outside")
    #expect(links["link-to-dir"] == "bin")
    #expect(dirs.contains("empty-dir"))
    #expect(dirs.contains("dir-with-empty/inner"))
    #expect(files["unicode-ünïcødé-名前-🙂"] != nil)
    #expect(files[String(repeating: "n", count: 255)] != nil)
    #expect(dataBytes == files.values.reduce(0) { $0 + $1.0 })
    // contentOffset points at the file's bytes inside the NAR.
    let nar = fixture.nar
    let (_, _, off) = files["hello.txt"]!
    #expect(Array(nar[Int(off)..<Int(off) + 13]) == Array("hello, world\n".utf8))
  }

  /// The archive hash is the NarHash real Nix computes, and the store path matches `nix-store --add`.
  @Test func hashAndStorePathMatchNix() throws {
    let tmp = try TemporaryDirectory("nar-add")
    let tree = tmp.sub("small-tree")
    try Tree.file("\(tree)/x", "x")
    try Tree.symlink("\(tree)/y", to: "x")
    let nar = try NixFixture.dump(tree)
    let hash = NixHash.sha256(nar)
    let nixHash = try run(["nix-hash", "--type", "sha256", "--base32", tree], environment: NixFixture.environment)
    #expect(hash.nix32Digest == nixHash.trimmed)
    let added = try NixFixture(in: tmp.path).add(tree)
    #expect(try StorePath.addedSource(narHash: hash, name: "small-tree").path == added)
  }

  /// A root that is a single file, and one that is a symlink, as `nix-store --dump` writes them.
  @Test func nonDirectoryRoots() throws {
    let tmp = try TemporaryDirectory("nar-roots")
    try Tree.file(tmp.sub("f"), "just a file", executable: true)
    try Tree.symlink(tmp.sub("l"), to: "f")
    for p in ["f", "l"] {
      let nar = try NixFixture.dump(tmp.sub(p))
      #expect(try roundTrip(nar, pieceSize: 5).bytes == nar)
    }
  }

  @Test func truncationAtEveryByteIsRejected() throws {
    let nar = small
    for cut in 0..<nar.count {
      let prefix = Array(nar[0..<cut])
      // Streaming: the reader cannot know the end, so finish() reports the truncation.
      var reader = NARReader()
      let error = try #require(throws: NARError.self) {
        try reader.feed(prefix) { _ in }
        try reader.finish()
      }
      #expect(error.kind == .truncated, "cut at \(cut): \(error)")
      #expect(error.offset == UInt64(cut))
      // Knowing the size (a NarSize that lies), lengths past it are refused when they are read.
      var sized = NARReader(totalSize: UInt64(cut))
      #expect(throws: NARError.self) {
        try sized.feed(prefix) { _ in }
        try sized.finish()
      }
    }
  }

  @Test func writerRejectsBadSequences() {
    var w = NARWriter()
    #expect(throws: NARError.self) { try w.write(.endDirectory) }
    var w2 = NARWriter()
    #expect(throws: NARError.self) {
      try w2.write(.file(name: [], size: 3, executable: false, contentOffset: 0))
      try w2.write(.endFile)
    }
    var w3 = NARWriter()
    #expect(throws: NARError.self) {
      try w3.write(.directory(name: []))
      try w3.write(.symlink(name: Array("a/b".utf8), target: [1]))
    }
  }
}

@Suite struct NARWriterOrderTests {
  @Test func writerRefusesUnsortedEntries() throws {
    var w = NARWriter()
    try w.write(.directory(name: []))
    try w.write(.symlink(name: Array("b".utf8), target: Array("x".utf8)))
    #expect(throws: NARError.self) { try w.write(.symlink(name: Array("a".utf8), target: Array("x".utf8))) }
  }
}
