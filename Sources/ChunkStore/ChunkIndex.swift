internal import Crypto
import Foundation
import NixFormats
import Synchronization

/// The chunk index of one NAR on the wire (version 1): a manifest a cache signs after verifying the
/// whole NAR once, so that a node can serve files of the path chunk by chunk, each chunk checked
/// against its digest, without the NAR (Documentation/serve.md, "Chunk index v1").
///
/// The document is JSON: `{"version":1,"fingerprint":F,"signatures":[S…],"body":B}` where B is the
/// manifest as a JSON text in a string (so a verifier hashes exactly the bytes that were signed,
/// with no canonical form to agree on), and F is
/// `nixfs-chunk-index-1;<store path>;<NarHash>;<NarSize>;sha256:<hex SHA-256 of B's UTF-8>`,
/// signed like a narinfo fingerprint (Ed25519, Nix's `name:base64` keys).
public enum ChunkIndex {
  public static let version = 1

  public struct InvalidDocument: Error, Sendable, CustomStringConvertible {
    public let reason: String
    public var description: String { "chunk index: \(reason)" }
  }

  /// The body: what a node needs to present the tree and rebuild every file from chunks.
  struct Body: Codable {
    struct Node: Codable {
      /// Name bytes, base64 (NAR names are bytes); empty for the root.
      var name: String
      var parent: UInt32
      /// `directory`, `regular` or `symlink`.
      var type: String
      var firstChild: UInt32?
      var childCount: UInt32?
      /// Regular files: the content's name (hex), size and executable bit.
      var content: String?
      var size: UInt64?
      var executable: Bool?
      /// Symlinks: the target bytes, base64.
      var target: String?
    }
    struct Content: Codable {
      /// `[chunk SHA-256 hex, uncompressed size]`, in order.
      var chunks: [[String]]
      /// Where the content starts in its chunks' concatenation (packed small files), else absent.
      var skip: UInt32?
    }
    var storePath: String
    var narHash: String
    var narSize: UInt64
    var references: [String]
    var nodes: [Node]
    var contents: [String: Content]
  }

  struct Document: Codable {
    var version: Int
    var fingerprint: String
    var signatures: [String]
    var body: String
  }

  static func fingerprint(_ info: PathInfo, body: Data) -> String {
    let digest = SHA256.hash(data: body).map { String(format: "%02x", $0) }.joined()
    return "nixfs-chunk-index-1;\(info.storePath.path);\(info.narHash.nix32);\(info.narSize);sha256:\(digest)"
  }

  /// The signed document for a complete manifest (chunk lists included).
  public static func document(for manifest: Manifest, signedBy key: SecretKey) throws -> Data {
    var contents: [String: Body.Content] = [:]
    for (content, refs) in manifest.chunks {
      contents[content.hex] = Body.Content(
        chunks: refs.map { [$0.id.hex, String($0.size)] }, skip: manifest.slices[content])
    }
    let nodes = manifest.nodes.map { node -> Body.Node in
      var n = Body.Node(name: Data(node.name).base64EncodedString(), parent: node.parent, type: "")
      switch node.kind {
      case .directory(let first, let count):
        n.type = "directory"
        n.firstChild = first
        n.childCount = count
      case .regular(let content, let size, let executable):
        n.type = "regular"
        n.content = content.hex
        n.size = size
        n.executable = executable
      case .symlink(let target):
        n.type = "symlink"
        n.target = Data(target).base64EncodedString()
      }
      return n
    }
    let body = Body(
      storePath: manifest.info.storePath.path, narHash: manifest.info.narHash.nix32, narSize: manifest.info.narSize,
      references: manifest.info.referenceNames, nodes: nodes, contents: contents)
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    let bodyData = try encoder.encode(body)
    let fp = fingerprint(manifest.info, body: bodyData)
    let doc = Document(
      version: version, fingerprint: fp, signatures: [key.sign(fp).description],
      body: String(decoding: bodyData, as: UTF8.self))
    return try encoder.encode(doc)
  }

  /// Checks a document against the trusted keys and the narinfo it must agree with (store path,
  /// NarHash, NarSize), and returns its manifest. Throws unless every check passes.
  public static func verify(_ data: Data, trusting keys: TrustedKeys, for info: NarInfo) throws(InvalidDocument) -> Manifest {
    func bad(_ reason: String) -> InvalidDocument { InvalidDocument(reason: reason) }
    guard data.count <= 256 << 20 else { throw bad("document over 256 MiB") }
    let doc: Document
    do { doc = try JSONDecoder().decode(Document.self, from: data) } catch { throw bad("not a chunk index document") }
    guard doc.version == version else { throw bad("version \(doc.version), expected \(version)") }
    let bodyData = Data(doc.body.utf8)
    let body: Body
    do { body = try JSONDecoder().decode(Body.self, from: bodyData) } catch { throw bad("malformed body") }
    guard body.storePath == info.storePath.path, body.narHash == info.narHash.nix32, body.narSize == info.narSize else {
      throw bad("it is for \(LogText.bounded(body.storePath)) \(LogText.bounded(body.narHash)), not the narinfo's \(info.storePath) \(info.narHash)")
    }
    let pathInfo = PathInfo(info)
    guard Set(body.references) == Set(pathInfo.referenceNames) else { throw bad("its references are not the narinfo's") }
    guard doc.fingerprint == fingerprint(pathInfo, body: bodyData) else { throw bad("fingerprint does not match the body") }
    let sigs = doc.signatures.compactMap { try? NarSignature(parsing: $0) }
    guard keys.validSigner(of: doc.fingerprint, signatures: sigs) != nil else {
      throw bad("no valid signature by a trusted key (signed by \(sigs.map(\.keyName).joined(separator: ", ")))")
    }
    return try manifest(body, info: pathInfo)
  }

  static func manifest(_ body: Body, info: PathInfo) throws(InvalidDocument) -> Manifest {
    func bad(_ reason: String) -> InvalidDocument { InvalidDocument(reason: reason) }
    var nodes: [Manifest.Node] = []
    nodes.reserveCapacity(body.nodes.count)
    for (i, n) in body.nodes.enumerated() {
      guard let name = Data(base64Encoded: n.name) else { throw bad("node \(i): bad name") }
      let kind: Manifest.Kind
      switch n.type {
      case "directory":
        guard let first = n.firstChild, let count = n.childCount, UInt64(first) + UInt64(count) <= body.nodes.count,
          count == 0 || first > i
        else { throw bad("node \(i): bad children") }
        kind = .directory(firstChild: first, childCount: count)
      case "regular":
        guard let c = n.content, let content = ContentID(hex: c), let size = n.size, let x = n.executable,
          body.contents[c] != nil
        else { throw bad("node \(i): bad file") }
        kind = .regular(content: content, size: size, executable: x)
      case "symlink":
        guard let t = n.target, let target = Data(base64Encoded: t) else { throw bad("node \(i): bad symlink") }
        kind = .symlink(target: Array(target))
      default:
        throw bad("node \(i): unknown type")
      }
      guard n.parent < body.nodes.count else { throw bad("node \(i): bad parent") }
      nodes.append(Manifest.Node(name: Array(name), parent: n.parent, kind: kind))
    }
    guard !nodes.isEmpty else { throw bad("no nodes") }
    var chunks: [ContentID: [ChunkRef]] = [:]
    var slices: [ContentID: UInt32] = [:]
    for (c, content) in body.contents {
      guard let id = ContentID(hex: c) else { throw bad("bad content name") }
      var refs: [ChunkRef] = []
      for pair in content.chunks {
        guard pair.count == 2, let chunk = ChunkID(hex: pair[0]), let size = UInt32(pair[1]), size > 0 else {
          throw bad("content \(c.prefix(16)): bad chunk")
        }
        refs.append(ChunkRef(id: chunk, size: size))
      }
      chunks[id] = refs
      if let skip = content.skip { slices[id] = skip }
    }
    return Manifest(info: info, nodes: nodes, chunks: chunks, slices: slices)
  }
}
