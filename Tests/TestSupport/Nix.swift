import Foundation

/// Real Nix (Debian's nix-bin) on a private chroot store, so tests neither need nor touch /nix.
public struct NixFixture: Sendable {
  public let dir: String
  public let store: String
  /// The project's own Nix settings (scripts/nix/nix.conf) and nothing of the machine's: no
  /// /etc/nix/nix.conf, no user config, no inherited NIX_CONFIG, no daemon, and Nix's own caches
  /// (its narinfo SQLite cache) in a directory of the tests' rather than ~/.cache.
  public static let environment = [
    "NIX_CONF_DIR": "\(repositoryRoot)/scripts/nix",
    "NIX_USER_CONF_FILES": "",
    "NIX_CONFIG": "",
    "NIX_REMOTE": "",
    "XDG_CACHE_HOME": (NSTemporaryDirectory() as NSString).appendingPathComponent("nixfs-tests-nix-cache"),
  ]

  public init(in dir: String) {
    self.dir = dir
    self.store = (dir as NSString).appendingPathComponent("nix-root")
  }

  @discardableResult
  public func nix(_ args: [String], stdin: [UInt8]? = nil) throws -> CommandResult {
    try run(args, environment: Self.environment, stdin: stdin)
  }

  /// `nix-store --add`: the content-addressed store path of a tree.
  public func add(_ tree: String) throws -> String {
    try nix(["nix-store", "--store", store, "--add", tree]).trimmed
  }

  /// `nix-store --dump` of any path (works on trees outside the store too).
  public static func dump(_ path: String) throws -> [UInt8] {
    try run(["nix-store", "--dump", path], environment: environment).stdout
  }

  /// Generates a signing key pair; returns (secret key file, public key text).
  public func generateKey(_ name: String) throws -> (secretFile: String, publicKey: String) {
    let sk = (dir as NSString).appendingPathComponent("\(name).sk")
    let pk = (dir as NSString).appendingPathComponent("\(name).pk")
    try nix(["nix-store", "--generate-binary-cache-key", name, sk, pk])
    return (sk, try String(contentsOfFile: pk, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))
  }

  public func sign(_ paths: [String], keyFile: String) throws {
    try nix(["nix", "store", "sign", "--store", store, "--key-file", keyFile] + paths)
  }

  /// `nix copy --to file://cache?compression=…&write-nar-listing=1`: a real binary cache.
  public func copy(_ paths: [String], toCache cache: String, compression: String = "zstd") throws {
    try nix([
      "nix", "copy", "--store", store, "--to",
      "file://\(cache)?compression=\(compression)&write-nar-listing=1",
    ] + paths)
  }
}

/// Builds trees on disk for fixtures.
public enum Tree {
  public static func file(_ path: String, _ contents: [UInt8], executable: Bool = false) throws {
    try FileManager.default.createDirectory(
      atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    guard FileManager.default.createFile(atPath: path, contents: Data(contents)) else {
      throw CommandError(argv: ["create", path], status: -1, stderr: "cannot create file")
    }
    try FileManager.default.setAttributes([.posixPermissions: executable ? 0o755 : 0o644], ofItemAtPath: path)
  }

  public static func file(_ path: String, _ text: String, executable: Bool = false) throws {
    try file(path, Array(text.utf8), executable: executable)
  }

  public static func directory(_ path: String) throws {
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  }

  public static func symlink(_ path: String, to target: String) throws {
    try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: target)
  }

  /// Deterministic pseudo-random bytes (xorshift), so fixtures are reproducible. Every seed gives
  /// other bytes: the seed is mixed (a bijection) rather than forced odd, which made 2k and 2k+1
  /// the same stream.
  public static func bytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var z = seed &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    var state = max(z ^ (z >> 31), 1)
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { buf in
      var i = 0
      while i < count {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        withUnsafeBytes(of: state) { word in
          for k in 0..<min(8, count - i) { buf[i + k] = word[k] }
        }
        i += 8
      }
    }
    return out
  }

  /// A tree with every kind of node and edge case the NAR format has.
  public static func everyKind(at root: String, bigFileBytes: Int = 24 << 20) throws {
    try directory(root)
    try file("\(root)/empty", [])
    try file("\(root)/hello.txt", "hello, world\n")
    try file("\(root)/exactly8", "12345678")
    try file("\(root)/seven", "1234567")
    try file("\(root)/nine", "123456789")
    try file("\(root)/bin/tool", "#!/bin/sh\necho tool\n", executable: true)
    try file("\(root)/bin/empty-exec", [], executable: true)
    try directory("\(root)/empty-dir")
    try directory("\(root)/dir-with-empty/inner")
    try symlink("\(root)/link-to-dir", to: "bin")
    try symlink("\(root)/dangling", to: "does/not/exist")
    try symlink("\(root)/absolute", to: "/etc/hostname")
    try symlink("\(root)/dotdot", to: "../outside")
    try file("\(root)/unicode-ünïcødé-名前-🙂", "unicode\n")
    try file("\(root)/" + String(repeating: "n", count: 255), "long name\n")
    var deep = root
    for i in 0..<40 { deep += "/d\(i)" }
    try file("\(deep)/bottom", "deep\n")
    // Names that sort differently bytewise than by locale.
    for name in ["B", "a", "_", "Z", "z", "-", "0", "a.b", "a-b", "ab"] {
      try file("\(root)/order/\(name)", name)
    }
    try file("\(root)/big.bin", bytes(bigFileBytes + 3, seed: 42))
    try file("\(root)/random-1000", bytes(1000, seed: 7))
  }
}
