import Foundation
import NixFormats
import Testing
import TestSupport

@Suite struct Nix32AndHashTests {
  @Test func emptySha256MatchesNix() {
    #expect(NixHash.sha256([UInt8]()).nix32Digest == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73")
  }

  @Test func lengths() {
    #expect(Nix32.encodedLength(byteCount: 20) == 32)
    #expect(Nix32.encodedLength(byteCount: 32) == 52)
    #expect(Nix32.encodedLength(byteCount: 64) == 103)
  }

  @Test(arguments: [1, 16, 20, 32, 64])
  func roundTrip(size: Int) {
    for seed in 1...50 {
      let bytes = Tree.bytes(size, seed: UInt64(seed * 1000 + size))
      let text = Nix32.encode(bytes)
      #expect(Nix32.decode(text, byteCount: size) == bytes)
    }
  }

  @Test func rejectsInvalidText() {
    let valid = Nix32.encode(Tree.bytes(32, seed: 3))
    #expect(Nix32.decode(valid.replacingOccurrences(of: valid.prefix(1), with: "e"), byteCount: 32) == nil)
    #expect(Nix32.decode(valid.dropLast(), byteCount: 32) == nil)
    // 52 characters hold 260 bits: a leading digit above 0-7 overflows 32 bytes.
    #expect(Nix32.decode("z" + valid.dropFirst(), byteCount: 32) == nil)
  }

  /// Every form we print is converted by real Nix to the same hash.
  @Test func formsAgreeWithNix() throws {
    for seed in 1...5 {
      let hash = NixHash.sha256(Tree.bytes(100, seed: UInt64(seed)))
      let fromHex = try run(["nix-hash", "--type", "sha256", "--to-base32", hash.hex], environment: NixFixture.environment)
      #expect(fromHex.trimmed == hash.nix32Digest)
      let sri = try run(["nix", "hash", "to-sri", hash.nix32], environment: NixFixture.environment)
      #expect(sri.trimmed == hash.sri)
      #expect(try NixHash(parsing: hash.nix32) == hash)
      #expect(try NixHash(parsing: "sha256:" + hash.hex) == hash)
      #expect(try NixHash(parsing: hash.sri) == hash)
      #expect(try NixHash(parsing: hash.nix32Digest, defaultAlgorithm: .sha256) == hash)
    }
  }

  @Test func malformedHashes() {
    #expect(throws: NixHashError.self) { try NixHash(parsing: "sha256:abc") }
    #expect(throws: NixHashError.self) { try NixHash(parsing: "md6:" + String(repeating: "0", count: 32)) }
    #expect(throws: NixHashError.self) { try NixHash(parsing: String(repeating: "0", count: 64)) }
    #expect(throws: NixHashError.self) { try NixHash(parsing: "sha256-notbase64!!") }
  }
}
