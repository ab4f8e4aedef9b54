import Foundation
import NixFormats
import Testing
import TestSupport

@Suite struct StorePathTests {
  let hash = "0s0wbnqb68c3zm9vrh0ray3iaw84d1bh"

  @Test func parses() throws {
    let p = try StorePath("/nix/store/\(hash)-hello-2.12.1")
    #expect(p.hashPart == hash)
    #expect(p.name == "hello-2.12.1")
    #expect(p.baseName == "\(hash)-hello-2.12.1")
    #expect(p.path == "/nix/store/\(hash)-hello-2.12.1")
    #expect(try StorePath(baseName: "\(hash)-a+b=c?d_e.f") .name == "a+b=c?d_e.f")
  }

  @Test(arguments: [
    "/nix/store/", "/nix/store/short-x", "/nix/store/\(String(repeating: "e", count: 32))-x",
    "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh", "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-",
    "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-.hidden", "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a/b",
    "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a/", "/nix/store/../etc/passwd", "/nix//store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a",
    "/gnu/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a", "nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a",
    "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-a b", "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-..",
    "/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-" + String(repeating: "x", count: 212),
  ])
  func rejects(_ text: String) {
    #expect(throws: StorePathError.self) { try StorePath(text) }
  }

  @Test func longestNameAccepted() throws {
    #expect(try StorePath("/nix/store/\(hash)-" + String(repeating: "x", count: 211)).name.count == 211)
  }

  /// Our hash parts are the ones `nix-store --add` computes.
  @Test func addedPathsMatchNix() throws {
    let tmp = try TemporaryDirectory("storepath")
    let nix = NixFixture(in: tmp.path)
    for (i, name) in ["tree", "with-dash-1.0", "x"].enumerated() {
      let tree = tmp.sub(name)
      try Tree.file("\(tree)/f", Tree.bytes(100 + i, seed: UInt64(i)))
      let added = try nix.add(tree)
      let narHash = NixHash.sha256(try NixFixture.dump(tree))
      #expect(try StorePath.addedSource(narHash: narHash, name: name).path == added)
    }
  }
}
