import Foundation
import NixFormats

/// The narinfo metadata kept with a store path (what Nix needs to register it later).
public struct PathInfo: Sendable, Hashable {
  public var storePath: StorePath
  public var narHash: NixHash
  public var narSize: UInt64
  /// Referenced store paths (in the same store directory).
  public var references: [StorePath]
  public var deriver: String?
  public var signatures: [String]
  public var ca: String?

  public init(
    storePath: StorePath, narHash: NixHash, narSize: UInt64, references: [StorePath] = [],
    deriver: String? = nil, signatures: [String] = [], ca: String? = nil
  ) {
    (self.storePath, self.narHash, self.narSize, self.references) = (storePath, narHash, narSize, references)
    (self.deriver, self.signatures, self.ca) = (deriver, signatures, ca)
  }

  /// The references as base names, the way the index and the narinfo write them.
  public var referenceNames: [String] { references.map(\.baseName) }

  public init(_ info: NarInfo) {
    self.init(
      storePath: info.storePath, narHash: info.narHash, narSize: info.narSize, references: info.references,
      deriver: info.deriver, signatures: info.signatures.map(\.description), ca: info.ca)
  }
}

/// Text only at the edge, in the form it always had: the full path, `sha256:<nix32>`, the
/// references' base names. Decoding checks each, so a manifest with a malformed one is refused.
extension PathInfo: Codable {
  enum CodingKeys: String, CodingKey {
    case storePath, narHash, narSize, references, deriver, signatures, ca
  }

  public init(from decoder: any Decoder) throws {
    let c = try decoder.container(keyedBy: CodingKeys.self)
    let path = try c.decode(String.self, forKey: .storePath)
    let hash = try c.decode(String.self, forKey: .narHash)
    let names = try c.decode([String].self, forKey: .references)
    do {
      let storePath = try StorePath(parsingFull: path)
      self.init(
        storePath: storePath, narHash: try NixHash(parsing: hash), narSize: try c.decode(UInt64.self, forKey: .narSize),
        references: try names.map { name throws(StorePathError) in try StorePath(baseName: name, storeDir: storePath.storeDir) },
        deriver: try c.decodeIfPresent(String.self, forKey: .deriver),
        signatures: try c.decode([String].self, forKey: .signatures), ca: try c.decodeIfPresent(String.self, forKey: .ca))
    } catch let e as StorePathError {
      throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath, debugDescription: e.description))
    } catch let e as NixHashError {
      throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath, debugDescription: e.description))
    }
  }

  public func encode(to encoder: any Encoder) throws {
    var c = encoder.container(keyedBy: CodingKeys.self)
    try c.encode(storePath.path, forKey: .storePath)
    try c.encode(narHash.nix32, forKey: .narHash)
    try c.encode(narSize, forKey: .narSize)
    try c.encode(referenceNames, forKey: .references)
    try c.encodeIfPresent(deriver, forKey: .deriver)
    try c.encode(signatures, forKey: .signatures)
    try c.encodeIfPresent(ca, forKey: .ca)
  }
}

/// One chunk of a file: its name and uncompressed length. A file's chunks, in order, concatenate
/// to its bytes (for a packed small file: to bytes that hold its bytes, see `Manifest.slices`).
public struct ChunkRef: Codable, Sendable, Hashable {
  public var id: ChunkID
  public var size: UInt32
  public init(id: ChunkID, size: UInt32) {
    self.id = id
    self.size = size
  }
}

/// A store path's tree plus the chunk list of every distinct file content: with the chunks, it is
/// all that is needed to rebuild the NAR byte for byte, so it is the unit to send between nodes.
///
/// Nodes are flat, in breadth-first order: node 0 is the root, and a directory's children are
/// contiguous and sorted bytewise by name (NAR order), so lookup is a binary search and readdir a
/// slice. Node indices are stable for a stored path, so the filesystem can derive inode numbers.
public struct Manifest: Codable, Sendable, Hashable {
  public enum Kind: Codable, Sendable, Hashable {
    case directory(firstChild: UInt32, childCount: UInt32)
    case regular(content: ContentID, size: UInt64, executable: Bool)
    case symlink(target: [UInt8])
  }

  public struct Node: Codable, Sendable, Hashable {
    /// Raw name bytes; empty for the root.
    public var name: [UInt8]
    /// Index of the parent directory; the root is its own parent.
    public var parent: UInt32
    public var kind: Kind
  }

  public var info: PathInfo
  public var nodes: [Node]
  /// Chunk lists of the distinct contents of this path. Empty when loaded with `tree(of:)`.
  public var chunks: [ContentID: [ChunkRef]]
  /// Small files packed with others into a shared chunk: the content is `size` bytes of its
  /// chunk list's concatenation starting at this offset. Absent for every other content.
  public var slices: [ContentID: UInt32]

  public static let root = 0

  /// The tree and metadata alone, as `tree(of:)` loads them: what the filesystem caches.
  public var withoutChunkLists: Manifest { Manifest(info: info, nodes: nodes, chunks: [:]) }

  public init(info: PathInfo, nodes: [Node], chunks: [ContentID: [ChunkRef]], slices: [ContentID: UInt32] = [:]) {
    self.info = info
    self.nodes = nodes
    self.chunks = chunks
    self.slices = slices
  }

  /// The slice entry of a content that is `size` bytes at `skip` of its chunks' `total` bytes:
  /// none where the content is all of them.
  static func slice(skip: UInt64, size: UInt64, of total: UInt64) -> UInt32? {
    skip > 0 || size != total ? UInt32(skip) : nil
  }

  /// `slices` may be absent: manifests written before small files were packed have none.
  public init(from decoder: any Decoder) throws {
    let c = try decoder.container(keyedBy: CodingKeys.self)
    info = try c.decode(PathInfo.self, forKey: .info)
    nodes = try c.decode([Node].self, forKey: .nodes)
    chunks = try c.decode([ContentID: [ChunkRef]].self, forKey: .chunks)
    slices = try c.decodeIfPresent([ContentID: UInt32].self, forKey: .slices) ?? [:]
  }

  /// Children of directory `node` (empty for other kinds).
  public func children(of node: Int) -> Range<Int> {
    guard case .directory(let first, let count) = nodes[node].kind else { return 0..<0 }
    return Int(first)..<Int(first + count)
  }

  /// The child of directory `node` called `name`, by binary search.
  public func lookup(_ node: Int, _ name: [UInt8]) -> Int? {
    let range = children(of: node)
    var lo = range.lowerBound
    var hi = range.upperBound
    while lo < hi {
      let mid = (lo + hi) / 2
      let n = nodes[mid].name
      if n == name { return mid }
      if n.lexicographicallyPrecedes(name) { lo = mid + 1 } else { hi = mid }
    }
    return nil
  }

  /// Resolves a relative path such as `bin/hello` without following symlinks.
  public func lookup(path: String) -> Int? {
    var node = Self.root
    for part in path.split(separator: "/") where !part.isEmpty {
      guard let next = lookup(node, Array(part.utf8)) else { return nil }
      node = next
    }
    return node
  }

  /// Distinct file contents, with their sizes.
  public var contents: [ContentID: UInt64] {
    var out: [ContentID: UInt64] = [:]
    for n in nodes { if case .regular(let c, let size, _) = n.kind { out[c] = size } }
    return out
  }

  /// How many files of the tree have each distinct content, and its size: the references a
  /// commit gives each content.
  public var multiplicity: [ContentID: (count: Int, size: UInt64)] {
    var out: [ContentID: (count: Int, size: UInt64)] = [:]
    for n in nodes { if case .regular(let c, let size, _) = n.kind { out[c, default: (0, size)].count += 1 } }
    return out
  }

  /// Sum of the regular files' sizes.
  public var fileBytes: UInt64 {
    nodes.reduce(0) { if case .regular(_, let s, _) = $1.kind { $0 + s } else { $0 } }
  }

  /// Replays the tree as NAR events in archive order; `content` streams each file's bytes.
  public func replay(
    _ emit: (NAREvent) throws -> Void,
    content: (ContentID, UInt64, (UnsafeRawBufferPointer) throws -> Void) throws -> Void
  ) throws {
    try withoutActuallyEscaping(emit) { emit in
      try withoutActuallyEscaping(content) { content in
        try replayEscaping(emit, content: content)
      }
    }
  }

  private func replayEscaping(
    _ emit: @escaping (NAREvent) throws -> Void,
    content: @escaping (ContentID, UInt64, (UnsafeRawBufferPointer) throws -> Void) throws -> Void
  ) throws {
    func visit(_ i: Int) throws {
      let node = nodes[i]
      switch node.kind {
      case .directory:
        try emit(.directory(name: node.name))
        for c in children(of: i) { try visit(c) }
        try emit(.endDirectory)
      case .regular(let c, let size, let exec):
        try emit(.file(name: node.name, size: size, executable: exec, contentOffset: 0))
        if size > 0 { try content(c, size) { try emit(.data($0)) } }
        try emit(.endFile)
      case .symlink(let target):
        try emit(.symlink(name: node.name, target: target))
      }
    }
    try visit(Self.root)
  }
}
