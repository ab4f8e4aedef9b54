import NixFormats
import Testing

/// Builds raw NAR token streams, valid or not.
struct RawNAR {
  var bytes: [UInt8] = []
  mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
  mutating func str(_ s: [UInt8], padding: UInt8 = 0) {
    u64(UInt64(s.count))
    bytes += s
    bytes += [UInt8](repeating: padding, count: (8 - s.count % 8) % 8)
  }
  mutating func str(_ s: String) { str(Array(s.utf8)) }
  mutating func tokens(_ list: String...) { for t in list { str(t) } }

  static func file(_ contents: String = "abc") -> RawNAR {
    var n = RawNAR()
    n.tokens("nix-archive-1", "(", "type", "regular", "contents", contents, ")")
    return n
  }

  /// A directory root with the given entries, each a regular file.
  static func directory(_ names: [[UInt8]]) -> RawNAR {
    var n = RawNAR()
    n.tokens("nix-archive-1", "(", "type", "directory")
    for name in names {
      n.tokens("entry", "(", "name")
      n.str(name)
      n.tokens("node", "(", "type", "regular", "contents", "x", ")", ")")
    }
    n.str(")")
    return n
  }
}

func parseError(_ nar: RawNAR, maxDepth: Int = 256, sized: Bool = true) -> NARError? {
  var reader = NARReader(maxDepth: maxDepth, totalSize: sized ? UInt64(nar.bytes.count) : nil)
  do {
    try reader.feed(nar.bytes) { _ in }
    try reader.finish()
    return nil
  } catch let e as NARError {
    return e
  } catch {
    Issue.record("unexpected error type: \(error)")
    return nil
  }
}

@Suite struct MalformedNARTests {
  @Test func validBaselines() {
    #expect(parseError(.file()) == nil)
    #expect(parseError(.directory([Array("a".utf8), Array("b".utf8)])) == nil)
  }

  @Test func badMagic() {
    var n = RawNAR()
    n.tokens("nix-archive-2", "(", "type", "regular", "contents", "", ")")
    #expect(parseError(n)?.kind == .badMagic)
    #expect(parseError(n)?.offset == 0)
  }

  @Test func unexpectedTokens() {
    for bad in [
      ["nix-archive-1", "[", "type", "regular", "contents", "", ")"],
      ["nix-archive-1", "(", "tipe", "regular", "contents", "", ")"],
      ["nix-archive-1", "(", "type", "fifo"],
      ["nix-archive-1", "(", "type", "regular", "content", "", ")"],
      ["nix-archive-1", "(", "type", "regular", "contents", "", "]"],
      ["nix-archive-1", "(", "type", "symlink", "targets", "x", ")"],
      ["nix-archive-1", "(", "type", "directory", "entries"],
      ["nix-archive-1", "(", "type", "directory", "entry", "(", "nam", "x"],
    ] {
      var n = RawNAR()
      for t in bad { n.str(t) }
      guard case .unexpectedToken = parseError(n, sized: false)?.kind else {
        Issue.record("not rejected as an unexpected token: \(bad) -> \(String(describing: parseError(n, sized: false)))")
        continue
      }
    }
  }

  @Test func nonEmptyExecutableValue() {
    var n = RawNAR()
    n.tokens("nix-archive-1", "(", "type", "regular", "executable", "1", "contents", "", ")")
    #expect(parseError(n)?.kind == .nonEmptyExecutableValue)
  }

  @Test(arguments: [[], Array(".".utf8), Array("..".utf8), Array("a/b".utf8), [0x61, 0, 0x62], [UInt8](repeating: 0x61, count: 256)])
  func invalidNames(_ name: [UInt8]) {
    guard case .invalidName = parseError(.directory([name]))?.kind else {
      Issue.record("name \(name.prefix(8)) accepted")
      return
    }
  }

  @Test func entriesMustBeStrictlySorted() {
    let e1 = parseError(.directory([Array("b".utf8), Array("a".utf8)]))
    guard case .entriesNotSorted = e1?.kind else { Issue.record("unsorted accepted"); return }
    let e2 = parseError(.directory([Array("a".utf8), Array("a".utf8)]))
    guard case .entriesNotSorted = e2?.kind else { Issue.record("duplicate accepted"); return }
    // Bytewise order: "B" (0x42) sorts before "a" (0x61); "a" before "a-b"; "ü" after "z".
    #expect(parseError(.directory([Array("B".utf8), Array("a".utf8), Array("a-b".utf8), Array("z".utf8), Array("ü".utf8)])) == nil)
  }

  @Test func symlinkTargets() {
    for target in [[], [0x61, 0x00]] as [[UInt8]] {
      var n = RawNAR()
      n.tokens("nix-archive-1", "(", "type", "symlink", "target")
      n.str(target)
      n.str(")")
      guard case .invalidSymlinkTarget = parseError(n)?.kind else {
        Issue.record("target \(target) accepted")
        continue
      }
    }
    var ok = RawNAR()
    ok.tokens("nix-archive-1", "(", "type", "symlink", "target", "/abs/../x", ")")
    #expect(parseError(ok) == nil)
  }

  @Test func nonZeroPadding() {
    // In a token.
    var n = RawNAR()
    n.tokens("nix-archive-1")
    n.str(Array("(".utf8), padding: 1)
    #expect(parseError(n, sized: false)?.kind == .nonZeroPadding)
    #expect(parseError(n, sized: false)?.offset == 8 + 16 + 8 + 1)
    // After file contents.
    var f = RawNAR()
    f.tokens("nix-archive-1", "(", "type", "regular", "contents")
    f.str(Array("abc".utf8), padding: 7)
    f.str(")")
    #expect(parseError(f)?.kind == .nonZeroPadding)
  }

  @Test func absurdLengths() {
    for length in [UInt64.max, UInt64.max - 7, 1 << 40, 1 << 62] {
      // As file contents: refused at once against the known size; refused at finish when streaming.
      var n = RawNAR()
      n.tokens("nix-archive-1", "(", "type", "regular", "contents")
      n.u64(length)
      n.bytes += [1, 2, 3]
      #expect(parseError(n)?.kind == .lengthPastEnd(length: length))
      #expect(parseError(n, sized: false)?.kind == .truncated || parseError(n, sized: false)?.kind == .lengthPastEnd(length: length))
      // As a keyword or a name: refused by the string limit, never allocated.
      var k = RawNAR()
      k.tokens("nix-archive-1")
      k.u64(length)
      guard case .unexpectedToken = parseError(k, sized: false)?.kind else {
        Issue.record("huge keyword accepted")
        continue
      }
      var m = RawNAR()
      m.tokens("nix-archive-1", "(", "type", "directory", "entry", "(", "name")
      m.u64(length)
      guard case .invalidName = parseError(m, sized: false)?.kind else {
        Issue.record("huge name accepted")
        continue
      }
    }
  }

  @Test func nestingLimit() {
    func nested(_ depth: Int) -> RawNAR {
      var n = RawNAR()
      n.tokens("nix-archive-1", "(", "type", "directory")
      for _ in 0..<depth { n.tokens("entry", "(", "name", "d", "node", "(", "type", "directory") }
      for _ in 0..<depth { n.tokens(")", ")") }
      n.str(")")
      return n
    }
    #expect(parseError(nested(20), maxDepth: 20) == nil)
    #expect(parseError(nested(21), maxDepth: 20)?.kind == .tooDeep(limit: 20))
    #expect(parseError(nested(5000), maxDepth: 256)?.kind == .tooDeep(limit: 256))
  }

  @Test func trailingBytes() {
    var n = RawNAR.file()
    n.bytes += [0, 0, 0, 0, 0, 0, 0, 0]
    #expect(parseError(n)?.kind == .trailingBytes)
    #expect(parseError(n)?.offset == UInt64(n.bytes.count - 8))
  }

  @Test func errorsNameThePathInside() {
    var n = RawNAR()
    n.tokens("nix-archive-1", "(", "type", "directory", "entry", "(", "name", "sub", "node", "(", "type", "directory")
    n.tokens("entry", "(", "name", "f", "node", "(", "type", "regular", "contents", "x", "]")
    let e = parseError(n, sized: false)
    #expect(e?.path == "/sub/f")
    #expect(e?.description.contains("/sub/f") == true)
  }

  /// Random corruption of a valid archive: always a clean error or a valid parse, never a crash.
  @Test func randomCorruptionNeverCrashes() {
    var base = RawNAR.directory([Array("a".utf8), Array("b".utf8), Array("c".utf8)])
    base.bytes += []
    var state: UInt64 = 0x1234_5678
    var rejected = 0
    for _ in 0..<3000 {
      var bytes = base.bytes
      for _ in 0..<3 {
        state = state &* 6_364_136_223_846_793_005 &+ 1
        bytes[Int(state >> 33) % bytes.count] = UInt8(truncatingIfNeeded: state >> 17)
      }
      var reader = NARReader()
      do {
        try reader.feed(bytes) { _ in }
        try reader.finish()
      } catch is NARError {
        rejected += 1
      } catch {
        Issue.record("unexpected error \(error)")
      }
    }
    #expect(rejected > 2500)
  }
}
