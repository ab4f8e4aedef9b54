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

extension NixfsWire {
  /// `POST`: many chunks in one answer. The body names them, one SHA-256 (hex) per line; the
  /// answer is one frame per name, in order, each a `ChunkBatch.Frame` header and the chunk as
  /// stored. A node checks every chunk against its name before using it, as for `Route.chunk`.
  public static let chunkBatchRoute = "\(version)/chunks"

  public enum ChunkBatch {
    /// The most chunks one request may name (a serve refuses more with 400).
    public static let maxChunks = 512
    /// The header of each frame: digest (32), encoding (1), stored length (4, LE), size (4, LE).
    public static let headerSize = 41

    public enum Encoding: UInt8, Sendable {
      case identity = 0
      case zstd = 1
      /// The serve does not have it: no bytes follow.
      case absent = 2
    }

    public struct Frame: Sendable, Equatable {
      public let digest: [UInt8]
      public let encoding: Encoding
      public let bytes: [UInt8]
      /// The uncompressed size the serve claims (checked by the node with the digest).
      public let size: UInt32
      public init(digest: [UInt8], encoding: Encoding, bytes: [UInt8], size: UInt32) {
        (self.digest, self.encoding, self.bytes, self.size) = (digest, encoding, bytes, size)
      }
    }

    public struct Malformed: Error, Sendable, CustomStringConvertible {
      public let reason: String
      public var description: String { "malformed chunk batch: \(reason)" }
    }

    public static func request(_ hexDigests: [String]) -> [UInt8] { Array(hexDigests.joined(separator: "\n").utf8) }

    /// The digests a request names, or why it is refused.
    public static func parseRequest(_ body: [UInt8]) throws(Malformed) -> [[UInt8]] {
      var out: [[UInt8]] = []
      for line in body.split(separator: 0x0a, omittingEmptySubsequences: true) {
        guard line.count == 64, let digest = hexBytes(line) else { throw Malformed(reason: "a line is not a SHA-256 in hex") }
        out.append(digest)
        if out.count > maxChunks { throw Malformed(reason: "more than \(maxChunks) chunks") }
      }
      return out
    }

    public static func header(digest: [UInt8], encoding: Encoding, stored: Int, size: Int) -> [UInt8] {
      digest + [encoding.rawValue] + UInt32(stored).littleEndianBytes + UInt32(size).littleEndianBytes
    }

    /// Cuts an answer into frames as its bytes arrive. `limit` bounds any one frame's stored
    /// bytes (what the largest chunk can take compressed).
    public struct Parser: Sendable {
      var buffer: [UInt8] = []
      let limit: Int
      public init(limit: Int) { self.limit = limit }

      /// The frames completed by `bytes`.
      public mutating func feed(_ bytes: some Collection<UInt8>) throws(Malformed) -> [Frame] {
        buffer.append(contentsOf: bytes)
        var frames: [Frame] = []
        var at = 0
        while buffer.count - at >= headerSize {
          guard let encoding = Encoding(rawValue: buffer[at + 32]) else { throw Malformed(reason: "unknown encoding") }
          let stored = Int(UInt32(littleEndianAt: buffer, at + 33))
          let size = UInt32(littleEndianAt: buffer, at + 37)
          guard stored <= limit, encoding != .absent || stored == 0 else {
            throw Malformed(reason: "a frame of \(stored) bytes")
          }
          guard buffer.count - at - headerSize >= stored else { break }
          let start = at + headerSize
          frames.append(
            Frame(digest: Array(buffer[at..<at + 32]), encoding: encoding, bytes: Array(buffer[start..<start + stored]), size: size))
          at = start + stored
        }
        if at > 0 { buffer.removeFirst(at) }
        return frames
      }

      /// Bytes of a frame not yet complete (a cut-off answer).
      public var pending: Int { buffer.count }
    }

    static func hexBytes(_ text: some Collection<UInt8>) -> [UInt8]? {
      func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x61...0x66: c - 0x61 + 10
        case 0x41...0x46: c - 0x41 + 10
        default: nil
        }
      }
      var out: [UInt8] = []
      var high: UInt8?
      for c in text {
        guard let n = nibble(c) else { return nil }
        if let h = high {
          out.append(h << 4 | n)
          high = nil
        } else {
          high = n
        }
      }
      return high == nil ? out : nil
    }
  }
}

extension UInt32 {
  fileprivate var littleEndianBytes: [UInt8] { withUnsafeBytes(of: littleEndian) { Array($0) } }
  fileprivate init(littleEndianAt bytes: [UInt8], _ offset: Int) {
    self = UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
      | UInt32(bytes[offset + 3]) << 24
  }
}
