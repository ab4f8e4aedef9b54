import ChunkStore
import Foundation
import NixFormats
import Testing
import TestSupport

/// The signed chunk index: a node that trusts the serve's key can check a manifest against a
/// narinfo and rebuild the NAR, byte for byte, from chunks fetched by digest.
@Suite(.serialized) struct ChunkIndexTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// Downloads chunks by digest into `dir` (one file per chunk, `<hex>.zstd` or `<hex>.raw`).
  static func fetchChunks(_ base: String, _ ids: [String], into dir: String) throws {
    try Tree.directory(dir)
    try run(["python3", "-c", """
      import sys, urllib.request
      base, out = sys.argv[1], sys.argv[2]
      for hex in sys.argv[3:]:
          r = urllib.request.urlopen(base + "/nixfs/v1/chunks/" + hex)
          enc = "zstd" if r.headers["X-Nixfs-Encoding"] == "zstd" else "raw"
          open(out + "/" + hex + "." + enc, "wb").write(r.read())
      """, base, dir] + ids)
  }

  /// The chunk's uncompressed bytes; its SHA-256 must be its name.
  static func chunk(_ dir: String, _ hex: String) throws -> [UInt8] {
    let raw: [UInt8]
    if FileManager.default.fileExists(atPath: "\(dir)/\(hex).zstd") {
      raw = try run(["zstd", "-d", "-c", "\(dir)/\(hex).zstd"]).stdout
    } else {
      raw = Array(try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(hex).raw")))
    }
    return raw
  }

  @Test func aNodeRebuildsEveryNARFromTheIndexAndChunks() throws {
    let tmp = try TemporaryDirectory("chunk-index")
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("serve-1")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"), extra: ["--secret-key-file", sk])
    #expect(try get("\(serve.url)/nix-cache-info").body.contains("NixfsChunkIndex: nixfs/v1"))
    let trusted = try TrustedKeys(parsing: [pk])
    for name in ["kinds", "app", "twin-a"] {
      let path = fx.paths[name]!
      let info = try NarInfo(parsing: try get("\(serve.url)/\(path.hashPart).narinfo").body)
      let doc = try run(["python3", "-c", "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
        "\(serve.url)/nixfs/v1/manifests/\(info.narHash.nix32Digest)"]).stdout
      let manifest = try ChunkIndex.verify(Data(doc), trusting: trusted, for: info)
      let ids = Set(manifest.chunks.values.flatMap { $0.map(\.id.hex) })
      let dir = tmp.sub("chunks-\(name)")
      try Self.fetchChunks(serve.url, ids.sorted(), into: dir)
      var bytes: [String: [UInt8]] = [:]
      for hex in ids {
        let raw = try Self.chunk(dir, hex)
        #expect(NixHash.sha256(raw).hex == hex, "\(name): chunk \(hex) does not hash to its name")
        bytes[hex] = raw
      }
      // Rebuild the NAR from the manifest and the chunks alone.
      var writer = NARWriter()
      try manifest.replay({ try writer.write($0) }) { content, size, emit in
        let all = manifest.chunks[content]!.flatMap { bytes[$0.id.hex]! }
        let skip = Int(manifest.slices[content] ?? 0)
        try all[skip..<(skip + Int(size))].withUnsafeBytes { try emit($0) }
      }
      let nar = writer.take()
      #expect(NixHash.sha256(nar) == info.narHash, "\(name): the rebuilt NAR is not the signed one")
      #expect(UInt64(nar.count) == info.narSize)
    }
  }

  @Test func forgedOrForeignIndexesAreRefused() throws {
    let tmp = try TemporaryDirectory("chunk-index-bad")
    let nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("serve-1")
    let (_, otherPK) = try nix.generateKey("other-1")
    let upstream = try CacheServer(directory: fx.caches["zstd"]!)
    let serve = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state"), extra: ["--secret-key-file", sk])
    let lib = try NarInfo(parsing: try get("\(serve.url)/\(fx.paths["lib"]!.hashPart).narinfo").body)
    let app = try NarInfo(parsing: try get("\(serve.url)/\(fx.paths["app"]!.hashPart).narinfo").body)
    let doc = Data(try run(["python3", "-c", "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
      "\(serve.url)/nixfs/v1/manifests/\(lib.narHash.nix32Digest)"]).stdout)
    let trusted = try TrustedKeys(parsing: [pk])
    #expect(throws: ChunkIndex.InvalidDocument.self) { try ChunkIndex.verify(doc, trusting: try TrustedKeys(parsing: [otherPK]), for: lib) }
    #expect(throws: ChunkIndex.InvalidDocument.self) { try ChunkIndex.verify(doc, trusting: trusted, for: app) }
    // The body changed after signing (a key renamed): refused.
    var text = String(decoding: doc, as: UTF8.self)
    let at = try #require(text.range(of: "executable"))
    text.replaceSubrange(at, with: "exekutable")
    #expect(throws: ChunkIndex.InvalidDocument.self) { try ChunkIndex.verify(Data(text.utf8), trusting: trusted, for: lib) }
    #expect(throws: ChunkIndex.InvalidDocument.self) { try ChunkIndex.verify(Data("{}".utf8), trusting: trusted, for: lib) }
    #expect(try ChunkIndex.verify(doc, trusting: trusted, for: lib).info.storePath == lib.storePath)
    // Unknown NARs and chunks are 404; a serve without a key offers no index.
    #expect(try get("\(serve.url)/nixfs/v1/manifests/\(String(repeating: "0", count: 52))").status == 404)
    #expect(try get("\(serve.url)/nixfs/v1/chunks/\(String(repeating: "0", count: 64))").status == 404)
    #expect(try get("\(serve.url)/nixfs/v1/chunks/zz").status == 400)
    let plain = try Serve(upstream: upstream, key: fx.publicKey, stateDir: tmp.sub("state-plain"))
    #expect(try !get("\(plain.url)/nix-cache-info").body.contains("NixfsChunkIndex"))
    #expect(try get("\(plain.url)/nixfs/v1/manifests/\(lib.narHash.nix32Digest)").status == 404)
  }
}
