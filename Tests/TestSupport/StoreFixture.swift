import Foundation
import NixFormats

/// Real store paths built by real Nix, signed, and copied into real binary caches (xz, zstd,
/// none). Built once per test process.
public final class StoreFixture: @unchecked Sendable {
  public let tmp: TemporaryDirectory
  public let nix: NixFixture
  public let publicKey: String
  /// name -> store path
  public let paths: [String: StorePath]
  /// store path -> the tree it was made from (for byte comparisons), when made by `nix-store --add`
  public let trees: [StorePath: String]
  public let caches: [String: String]

  private static let once = OnceFixture { try StoreFixture() }
  /// The process's fixture; throws (failing the asking test) when it could not be built.
  public static func shared() throws -> StoreFixture { try once.get() }

  init() throws {
    tmp = try TemporaryDirectory("fsfix", forProcess: true)
    nix = NixFixture(in: tmp.path)
    let (sk, pk) = try nix.generateKey("fs-test-1")
    publicKey = pk
    var paths: [String: StorePath] = [:]
    var trees: [StorePath: String] = [:]

    // Two paths sharing a 3 MiB file, to check inode and page-cache sharing.
    let blob = Tree.bytes(3 << 20, seed: 99)
    for name in ["twin-a", "twin-b"] {
      let t = tmp.sub(name)
      try Tree.file("\(t)/share/blob", blob)
      try Tree.file("\(t)/share/\(name).txt", "\(name)\n")
      let p = try StorePath(nix.add(t))
      paths[name] = p
      trees[p] = t
    }
    let kinds = tmp.sub("kinds")
    try Tree.everyKind(at: kinds, bigFileBytes: 6 << 20)
    paths["kinds"] = try StorePath(nix.add(kinds))
    trees[paths["kinds"]!] = kinds
    let other = tmp.sub("unrelated")
    try Tree.file("\(other)/data", Tree.bytes(100_000, seed: 5))
    paths["unrelated"] = try StorePath(nix.add(other))
    trees[paths["unrelated"]!] = other

    // A closure with references, built by nix-build with a busybox builder: app -> lib -> busybox.
    let bbt = tmp.sub("busybox")
    try FileManager.default.createDirectory(atPath: "\(bbt)/bin", withIntermediateDirectories: true)
    try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: "\(bbt)/bin/busybox")
    let busybox = try nix.add(bbt)
    let expr = tmp.sub("closure.nix")
    try """
      let bb = builtins.storePath "\(busybox)"; sh = "${bb}/bin/busybox"; in
      rec {
        lib = derivation { name = "lib"; system = "x86_64-linux"; builder = sh;
          args = ["sh" "-c" "${sh} mkdir -p $out/lib; echo libdata > $out/lib/data; ${sh} seq 1 20000 > $out/lib/numbers"]; };
        app = derivation { name = "app"; system = "x86_64-linux"; builder = sh;
          args = ["sh" "-c" "${sh} mkdir -p $out/bin; printf '#!${sh} sh\\n${sh} cat ${lib}/lib/data\\n' > $out/bin/app; ${sh} chmod +x $out/bin/app"]; };
      }
      """.write(toFile: expr, atomically: true, encoding: .utf8)
    let app = try nix.nix(["nix-build", "--store", nix.store, "--no-out-link", expr, "-A", "app"]).trimmed
    paths["app"] = try StorePath(app)
    let closure = try nix.nix(["nix-store", "--store", nix.store, "-qR", app]).trimmed.split(separator: "\n")
    for p in closure.map(String.init) {
      let sp = try StorePath(p)
      if sp.name == "lib" { paths["lib"] = sp }
      if sp.name == "busybox" { paths["busybox"] = sp }
    }
    let all = paths.values.map(\.path)
    try nix.sign(all, keyFile: sk)
    var caches: [String: String] = [:]
    for compression in ["xz", "zstd", "none"] {
      let dir = tmp.sub("cache-\(compression)")
      try nix.copy(all, toCache: dir, compression: compression)
      caches[compression] = dir
    }
    self.paths = paths
    self.trees = trees
    self.caches = caches
  }

  public func narInfo(_ path: StorePath, compression: String = "zstd") throws -> NarInfo {
    let text = try String(contentsOfFile: "\(caches[compression]!)/\(path.hashPart).narinfo", encoding: .utf8)
    return try NarInfo(parsing: text)
  }

  /// A copy of a cache, to tamper with.
  public func copyCache(_ compression: String, to dir: String) throws -> String {
    try run(["cp", "-a", caches[compression]!, dir])
    return dir
  }

  /// Arguments for `nixfs mount` trusting the fixture key.
  public func mountArguments(_ server: CacheServer, extra: [String] = []) -> [String] {
    ["--substituter", server.url, "--trusted-public-key", publicKey] + extra
  }

  /// NAR paths (`nar/…`) a server was asked for.
  public static func narRequests(_ server: CacheServer) -> [String] {
    server.requests.filter { $0.hasPrefix("/nar/") }
  }
}
