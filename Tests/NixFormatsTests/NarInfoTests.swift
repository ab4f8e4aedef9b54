import Foundation
import NixFormats
import Testing
import TestSupport

/// A real binary cache made by `nix copy --to file://`, signed with a key made by Nix.
struct RealCache {
  let tmp: TemporaryDirectory
  let nix: NixFixture
  let cache: String
  let publicKey: String
  let secretKeyFile: String
  let paths: [String]
  let trees: [String: String]

  init(compression: String = "zstd") throws {
    tmp = try TemporaryDirectory("cache")
    nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("test-key-1")
    secretKeyFile = sk
    publicKey = pk
    var paths: [String] = []
    var trees: [String: String] = [:]
    for name in ["alpha", "beta-1.0"] {
      let tree = tmp.sub(name)
      try Tree.file("\(tree)/bin/run", "#!/bin/sh\necho \(name)\n", executable: true)
      try Tree.file("\(tree)/share/data", Tree.bytes(5000, seed: 9))
      try Tree.symlink("\(tree)/lib", to: "share")
      let p = try nix.add(tree)
      paths.append(p)
      trees[p] = tree
    }
    try nix.sign(paths, keyFile: sk)
    cache = tmp.sub("binary-cache")
    try nix.copy(paths, toCache: cache, compression: compression)
    self.paths = paths
    self.trees = trees
  }

  func narinfoText(_ path: String) throws -> String {
    let hash = try StorePath(path).hashPart
    return try String(contentsOfFile: "\(cache)/\(hash).narinfo", encoding: .utf8)
  }
}

@Suite struct NarInfoTests {
  @Test(arguments: ["zstd", "xz", "none"])
  func realNarinfosParseVerifyAndSerialiseIdentically(compression: String) throws {
    let c = try RealCache(compression: compression)
    let trusted = try TrustedKeys(parsing: [c.publicKey])
    for path in c.paths {
      let text = try c.narinfoText(path)
      let info = try NarInfo(parsing: text, source: path)
      #expect(info.storePath.path == path)
      #expect(info.compression.description == compression)
      #expect(info.narHash == NixHash.sha256(try NixFixture.dump(c.trees[path]!)))
      #expect(try info.verify(trusting: trusted) == "test-key-1")
      #expect(info.serialized == text)
      // The NAR the cache holds, decompressed, hashes to FileHash when uncompressed.
      if compression == "none" {
        let nar = try Data(contentsOf: URL(fileURLWithPath: "\(c.cache)/\(info.url)"))
        #expect(NixHash.sha256(nar) == info.narHash)
        #expect(UInt64(nar.count) == info.narSize)
        #expect(info.fileHash == info.narHash)
      }
    }
  }

  @Test func otherKeyOrChangedFieldFails() throws {
    let c = try RealCache()
    let trusted = try TrustedKeys(parsing: [c.publicKey])
    let info = try NarInfo(parsing: try c.narinfoText(c.paths[0]))
    let other = SecretKey(generatingWithName: "test-key-1")
    // Same key name, other key: the signature does not verify.
    #expect(throws: SignatureError.self) { try info.verify(trusting: TrustedKeys([other.publicKey])) }
    // No keys trusted at all.
    let none = #expect(throws: SignatureError.self) { try info.verify(trusting: TrustedKeys([])) }
    #expect(none?.signers == ["test-key-1"])

    var size = info
    size.narSize += 1
    #expect(throws: SignatureError.self) { try size.verify(trusting: trusted) }
    var hash = info
    hash.narHash = NixHash.sha256([1, 2, 3])
    #expect(throws: SignatureError.self) { try hash.verify(trusting: trusted) }
    var refs = info
    refs.references = [try StorePath(c.paths[1])]
    #expect(throws: SignatureError.self) { try refs.verify(trusting: trusted) }
    var path = info
    path.storePath = try StorePath(c.paths[1])
    #expect(throws: SignatureError.self) { try path.verify(trusting: trusted) }
    // Unsigned fields may change.
    var url = info
    url.url = "nar/elsewhere.nar"
    url.compression = .none
    #expect(try url.verify(trusting: trusted) == "test-key-1")
  }

  /// Our signatures verify with the key Nix generated, and Nix's own check accepts them.
  @Test func signingWithNixSecretKey() throws {
    let c = try RealCache(compression: "none")
    let key = try SecretKey(parsing: String(contentsOfFile: c.secretKeyFile, encoding: .utf8))
    #expect(key.publicKey.description == c.publicKey)
    var info = try NarInfo(parsing: try c.narinfoText(c.paths[0]))
    info.signatures = []
    #expect(throws: SignatureError.self) { try info.verify(trusting: TrustedKeys(parsing: [c.publicKey])) }
    info.sign(with: key)
    #expect(try info.verify(trusting: TrustedKeys(parsing: [c.publicKey])) == "test-key-1")
    // Write it back and let real Nix verify the signature from the cache.
    let file = "\(c.cache)/\(info.storePath.hashPart).narinfo"
    try info.serialized.write(toFile: file, atomically: true, encoding: .utf8)
    let verified = try run(
      ["nix", "store", "verify", "--store", "file://\(c.cache)", "--trusted-public-keys", c.publicKey, info.storePath.path],
      environment: NixFixture.environment, check: false)
    #expect(verified.status == 0, "\(verified.stderr)")
  }

  @Test func listingsMatchTheReader() throws {
    let c = try RealCache(compression: "none")
    for path in c.paths {
      let hash = try StorePath(path).hashPart
      let listing = try NarListing(parsing: Data(contentsOf: URL(fileURLWithPath: "\(c.cache)/\(hash).ls")))
      guard case .directory(let top) = listing, case .directory(let bin) = top["bin"],
        case .regular(let size, let executable, let narOffset) = bin["run"]
      else {
        Issue.record("unexpected listing \(listing)")
        continue
      }
      #expect(executable)
      #expect(top["lib"] == .symlink(target: "share"))
      var seen: UInt64? = nil
      try NARReader.parse(try NixFixture.dump(c.trees[path]!)) { event in
        if case .file(let name, let s, _, let off) = event, name == Array("run".utf8) {
          #expect(s == size)
          seen = off
        }
      }
      #expect(seen == narOffset)
    }
  }

  @Test func cacheInfo() throws {
    let c = try RealCache()
    let info = try NixCacheInfo(parsing: try String(contentsOfFile: "\(c.cache)/nix-cache-info", encoding: .utf8))
    #expect(info.storeDir == "/nix/store")
    let custom = try NixCacheInfo(parsing: "StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\n")
    #expect(custom.storeDir == "/gnu/store")
    #expect(custom.priority == 40)
    #expect(custom.wantMassQuery)
    #expect(throws: NarInfoError.self) { try NixCacheInfo(parsing: "Priority: high\nStoreDir: /nix/store\n") }
    #expect(throws: NarInfoError.self) { try NixCacheInfo(parsing: "Priority: 10\n") }
  }

  static let good = """
    StorePath: /nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-tree
    URL: nar/0xhnxzzvg3wywcg695673s1cvvg469ph8gdsh7rcbcvwixknayrv.nar.zst
    Compression: zstd
    FileHash: sha256:0xhnxzzvg3wywcg695673s1cvvg469ph8gdsh7rcbcvwixknayrv
    FileSize: 179
    NarHash: sha256:1002fgabahzjx5f04cwagqfary5k6a55sn2dycf39120aq0jri5a
    NarSize: 648
    References: 
    Sig: k1:meuu165366HL5D4R/Yv42Cp0V+/wnZcylahzBBj2rQzpNBu1AudMMx+ZL7RVccLF4KnwlBE0f7uaJkb7I0jHCw==

    """

  @Test func parsesAndDefaults() throws {
    let info = try NarInfo(parsing: Self.good)
    #expect(info.references.isEmpty)
    #expect(info.fingerprint == "1;/nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-tree;sha256:1002fgabahzjx5f04cwagqfary5k6a55sn2dycf39120aq0jri5a;648;")
    let noCompression = try NarInfo(parsing: Self.good.replacingOccurrences(of: "Compression: zstd\n", with: ""))
    #expect(noCompression.compression == .bzip2)
    let unknownKey = try NarInfo(parsing: Self.good + "FutureField: 1\n")
    #expect(unknownKey.narSize == 648)
  }

  static let malformedCases: [(String, String)] = {
    let good = NarInfoTests.good
    var cases: [(String, String)] = []
    cases.append(("truncated", String(good.dropLast(30))))
    cases.append(("no StorePath", good.replacingOccurrences(of: "StorePath: /nix/store/0s0wbnqb68c3zm9vrh0ray3iaw84d1bh-tree\n", with: "")))
    cases.append(("no URL", good.replacingOccurrences(of: "URL: nar/0xhnxzzvg3wywcg695673s1cvvg469ph8gdsh7rcbcvwixknayrv.nar.zst\n", with: "")))
    cases.append(("no NarHash", good.replacingOccurrences(of: "NarHash: sha256:1002fgabahzjx5f04cwagqfary5k6a55sn2dycf39120aq0jri5a\n", with: "")))
    cases.append(("zero NarSize", good.replacingOccurrences(of: "NarSize: 648", with: "NarSize: 0")))
    cases.append(("bad NarSize", good.replacingOccurrences(of: "NarSize: 648", with: "NarSize: -1")))
    cases.append(("bad hash", good.replacingOccurrences(of: "NarHash: sha256:1002", with: "NarHash: sha256:e002")))
    cases.append(("md5 NarHash", good.replacingOccurrences(of: "NarHash: sha256:1002fgabahzjx5f04cwagqfary5k6a55sn2dycf39120aq0jri5a", with: "NarHash: md5:00000000000000000000000000000000")))
    cases.append(("bad path", good.replacingOccurrences(of: "/nix/store/0s0w", with: "/nix/store/../0")))
    cases.append(("other store", good.replacingOccurrences(of: "StorePath: /nix/store", with: "StorePath: /gnu/store")))
    cases.append(("bad reference", good.replacingOccurrences(of: "References: ", with: "References: nothash")))
    cases.append(("bad sig", good.replacingOccurrences(of: "Sig: k1:", with: "Sig: k1")))
    cases.append(("duplicate", good + "NarSize: 648\n"))
    cases.append(("garbage line", good + "just text\n"))
    cases.append(("empty", ""))
    return cases
  }()

  @Test(arguments: malformedCases)
  func malformed(_ label: String, _ text: String) {
    let error = #expect(throws: NarInfoError.self, "\(label)") { try NarInfo(parsing: text, source: "http://cache/x.narinfo") }
    #expect(error?.description.contains("http://cache/x.narinfo") == true)
  }

  @Test func keys() throws {
    #expect(throws: KeyError.self) { try PublicKey(parsing: "nocolon") }
    #expect(throws: KeyError.self) { try PublicKey(parsing: "name:AAAA") }
    let k = try PublicKey(parsing: "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
    #expect(k.name == "cache.nixos.org-1")
    #expect(k.description == "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
    let s = SecretKey(generatingWithName: "x")
    #expect(try SecretKey(parsing: s.serialized).publicKey == s.publicKey)
  }
}
