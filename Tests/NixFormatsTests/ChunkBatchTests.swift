import NixFormats
import Testing

/// The `nixfs/v1` chunk batch framing, as the serve writes it and the node reads it.
@Suite struct ChunkBatchTests {
  typealias Batch = NixfsWire.ChunkBatch

  func digest(_ n: UInt8) -> [UInt8] { [UInt8](repeating: n, count: 32) }

  @Test func framesSurviveAnySplitOfTheStream() throws {
    let frames = [
      Batch.Frame(digest: digest(1), encoding: .zstd, bytes: [1, 2, 3], size: 10),
      Batch.Frame(digest: digest(2), encoding: .absent, bytes: [], size: 0),
      Batch.Frame(digest: digest(3), encoding: .identity, bytes: Array(0..<200), size: 200),
    ]
    var stream: [UInt8] = []
    for f in frames { stream += Batch.header(digest: f.digest, encoding: f.encoding, stored: f.bytes.count, size: Int(f.size)) + f.bytes }
    for piece in [1, 7, 41, 42, 500] {
      var parser = Batch.Parser(limit: 1 << 20)
      var got: [Batch.Frame] = []
      var at = 0
      while at < stream.count {
        got += try parser.feed(stream[at..<min(stream.count, at + piece)])
        at += piece
      }
      #expect(got == frames, "pieces of \(piece)")
      #expect(parser.pending == 0)
    }
    // Cut inside the last frame: the first two are whole, the rest is pending.
    var parser = Batch.Parser(limit: 1 << 20)
    #expect(try parser.feed(stream.dropLast(10)) == Array(frames.prefix(2)))
    #expect(parser.pending > 0)
  }

  @Test func hostileFramesAndRequestsAreRefused() throws {
    var parser = Batch.Parser(limit: 1000)
    #expect(throws: Batch.Malformed.self) {
      try parser.feed(Batch.header(digest: digest(1), encoding: .identity, stored: 1001, size: 1001))
    }
    var unknown = Batch.header(digest: digest(1), encoding: .identity, stored: 0, size: 0)
    unknown[32] = 9
    var other = Batch.Parser(limit: 1000)
    #expect(throws: Batch.Malformed.self) { try other.feed(unknown) }
    var absentWithBytes = Batch.Parser(limit: 1000)
    #expect(throws: Batch.Malformed.self) {
      try absentWithBytes.feed(Batch.header(digest: digest(1), encoding: .absent, stored: 5, size: 5))
    }
    let hex = String(repeating: "ab", count: 32)
    #expect(try Batch.parseRequest(Batch.request([hex, hex.uppercased()])) == [[UInt8](repeating: 0xab, count: 32), [UInt8](repeating: 0xab, count: 32)])
    #expect(throws: Batch.Malformed.self) { try Batch.parseRequest(Array("not hex\n".utf8)) }
    #expect(throws: Batch.Malformed.self) { try Batch.parseRequest(Array((String(repeating: "z", count: 64)).utf8)) }
    #expect(throws: Batch.Malformed.self) {
      try Batch.parseRequest(Batch.request(Array(repeating: hex, count: Batch.maxChunks + 1)))
    }
  }
}
