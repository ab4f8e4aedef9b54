/// The `nixfs/v1` wire protocol between `nixfs serve` and the nodes (Documentation/serve.md,
/// "Chunk index v1"): the one definition of its routes, header names and bodies, for both sides.
/// Versioned: a v2 can sit beside it.
public enum NixfsWire {
  public static let version = "nixfs/v1"
  /// The `nix-cache-info` key that announces the protocol (`NixfsChunkIndex: nixfs/v1`).
  public static let cacheInfoKey = "NixfsChunkIndex"

  /// Paths below a cache's base URL.
  public enum Route {
    /// `GET`: the signed chunk index of a NAR, by its NarHash (nix32 digest); `path` (a hash
    /// part) lets a serve that does not hold it yet pull it through first.
    public static func manifest(narHashDigest: String, hashPart: String?) -> String {
      "\(version)/manifests/\(narHashDigest)" + (hashPart.map { "?path=\($0)" } ?? "")
    }
    /// `GET`: one chunk as stored, by the SHA-256 (hex) of its uncompressed bytes.
    public static func chunk(hex: String) -> String { "\(version)/chunks/\(hex)" }
    /// `GET`: the narinfos of a path's closure in one answer (`ClosureAnswer`).
    public static func closure(hashPart: String) -> String { "\(version)/closure/\(hashPart)" }
    /// `GET` a store path's startup profile; `POST` a node's report.
    public static func profile(hashPart: String) -> String { "\(version)/profiles/\(hashPart)" }

    /// The same routes as a router's patterns (`:name` parameters).
    public static let manifestPattern = "\(version)/manifests/:digest"
    public static let chunkPattern = "\(version)/chunks/:digest"
    public static let closurePattern = "\(version)/closure/:hash"
    public static let profilePattern = "\(version)/profiles/:hash"
  }

  public enum Header {
    /// A chunk's stored form: `zstd` (one frame) or `identity`.
    public static let encoding = "X-Nixfs-Encoding"
    /// A chunk's uncompressed size.
    public static let size = "X-Nixfs-Size"
  }

  /// The answer of `Route.closure`: each narinfo's text by hash part (checked by the node as if
  /// fetched alone).
  public struct ClosureAnswer: Codable, Sendable, Equatable {
    public var version: Int
    public var root: String
    public var narinfos: [String: String]
    public init(root: String, narinfos: [String: String]) {
      version = 1
      self.root = root
      self.narinfos = narinfos
    }
  }
}

extension NixfsWire {
  /// The `nix-cache-info` key of a serve that builds (`NixfsBuild: nixfs/v1`).
  public static let buildInfoKey = "NixfsBuild"

  /// `POST`: build (or report the build of) what a `BuildRequest` names.
  public static let buildsRoute = "\(version)/builds"

  /// What a node asks a serve to build: exactly one of an expression, a flake output or a
  /// derivation; who asked, for the log.
  public struct BuildRequest: Codable, Sendable, Equatable {
    public var nixExpr: String?
    public var flakeRef: String?
    /// A `.drv` store path.
    public var derivation: String?
    public var pod: String?
    public var namespace: String?
    public init(
      nixExpr: String? = nil, flakeRef: String? = nil, derivation: String? = nil, pod: String? = nil, namespace: String? = nil
    ) {
      (self.nixExpr, self.flakeRef, self.derivation, self.pod, self.namespace) = (nixExpr, flakeRef, derivation, pod, namespace)
    }
  }

  /// A build's state: `building` (ask again; HTTP 202), `done` (`storePath` is served; 200) or
  /// `failed` (`message`: Nix's error lines and the log's last lines; 422).
  public struct BuildAnswer: Codable, Sendable, Equatable {
    public var state: String
    public var what: String
    public var storePath: String?
    public var seconds: Double?
    public var message: String?
    public init(state: String, what: String, storePath: String? = nil, seconds: Double? = nil, message: String? = nil) {
      (self.state, self.what, self.storePath, self.seconds, self.message) = (state, what, storePath, seconds, message)
    }
  }
}
