import Foundation
import NixFormats

/// The narinfo metadata kept with a store path (what Nix needs to register it later).
public struct PathInfo: Codable, Sendable, Hashable {
  public var storePath: String
  /// `sha256:<nix32>`.
  public var narHash: String
  public var narSize: UInt64
  /// Base names of referenced store paths.
  public var references: [String]
  public var deriver: String?
  public var signatures: [String]
  public var ca: String?

  public init(
    storePath: StorePath, narHash: NixHash, narSize: UInt64, references: [StorePath] = [],
    deriver: String? = nil, signatures: [String] = [], ca: String? = nil
  ) {
    self.storePath = storePath.path
    self.narHash = narHash.nix32
    self.narSize = narSize
    self.references = references.map(\.baseName)
    self.deriver = deriver
    self.signatures = signatures
    self.ca = ca
  }

  public init(_ info: NarInfo) {
    self.init(
      storePath: info.storePath, narHash: info.narHash, narSize: info.narSize, references: info.references,
      deriver: info.deriver, signatures: info.signatures.map(\.description), ca: info.ca)
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

  // MARK: Compact binary form of the tree, as kept in the index.

  static let magic: [UInt8] = Array("NXFT1".utf8)

  func encodeTree() -> [UInt8] {
    var out = Self.magic
    putVarint(&out, UInt64(nodes.count))
    for n in nodes {
      putVarint(&out, UInt64(n.parent))
      putVarint(&out, UInt64(n.name.count))
      out += n.name
      switch n.kind {
      case .directory(let first, let count):
        out.append(0)
        putVarint(&out, UInt64(first))
        putVarint(&out, UInt64(count))
      case .regular(let c, let size, let exec):
        out.append(exec ? 2 : 1)
        putVarint(&out, size)
        out += c.bytes
      case .symlink(let target):
        out.append(3)
        putVarint(&out, UInt64(target.count))
        out += target
      }
    }
    return out
  }

  static func decodeTree(_ bytes: [UInt8]) -> [Node]? {
    var r = ByteReader(bytes: bytes)
    guard r.take(magic.count) == magic, let count = r.varint(), count < 1 << 32 else { return nil }
    var nodes: [Node] = []
    nodes.reserveCapacity(Int(count))
    for _ in 0..<count {
      guard let parent = r.varint(), let nameLen = r.varint(), nameLen <= 255, let name = r.take(Int(nameLen)),
        let tag = r.take(1)?.first
      else { return nil }
      let kind: Kind
      switch tag {
      case 0:
        guard let first = r.varint(), let cnt = r.varint(), first + cnt <= count else { return nil }
        kind = .directory(firstChild: UInt32(first), childCount: UInt32(cnt))
      case 1, 2:
        guard let size = r.varint(), let d = r.take(32) else { return nil }
        kind = .regular(content: SHA256Digest(bytes: d), size: size, executable: tag == 2)
      case 3:
        guard let len = r.varint(), len < 1 << 16, let t = r.take(Int(len)) else { return nil }
        kind = .symlink(target: t)
      default: return nil
      }
      guard parent < count else { return nil }
      nodes.append(Node(name: name, parent: UInt32(parent), kind: kind))
    }
    return r.atEnd && !nodes.isEmpty ? nodes : nil
  }
}

func putVarint(_ out: inout [UInt8], _ value: UInt64) {
  var v = value
  while v >= 0x80 {
    out.append(UInt8(truncatingIfNeeded: v) | 0x80)
    v >>= 7
  }
  out.append(UInt8(v))
}

struct ByteReader {
  let bytes: [UInt8]
  var i = 0
  init(bytes: [UInt8]) { self.bytes = bytes }
  var atEnd: Bool { i == bytes.count }
  mutating func take(_ n: Int) -> [UInt8]? {
    guard n >= 0, bytes.count - i >= n else { return nil }
    defer { i += n }
    return Array(bytes[i..<i + n])
  }
  mutating func varint() -> UInt64? {
    var v: UInt64 = 0
    var shift: UInt64 = 0
    while i < bytes.count, shift < 64 {
      let b = bytes[i]
      i += 1
      v |= UInt64(b & 0x7f) << shift
      if b < 0x80 { return v }
      shift += 7
    }
    return nil
  }
}

/// Builds the flat breadth-first node list from the NAR's depth-first events.
struct TreeBuilder {
  final class Temp {
    var name: [UInt8]
    var kind: Kind
    var children: [Temp] = []
    enum Kind { case directory, regular(file: Int, size: UInt64, executable: Bool), symlink([UInt8]) }
    init(name: [UInt8], kind: Kind) {
      self.name = name
      self.kind = kind
    }
  }

  var root: Temp?
  var stack: [Temp] = []

  mutating func add(_ node: Temp) {
    if let parent = stack.last { parent.children.append(node) } else { root = node }
  }

  mutating func directory(_ name: [UInt8]) {
    let t = Temp(name: name, kind: .directory)
    add(t)
    stack.append(t)
  }
  mutating func endDirectory() { stack.removeLast() }
  mutating func file(_ name: [UInt8], index: Int, size: UInt64, executable: Bool) {
    add(Temp(name: name, kind: .regular(file: index, size: size, executable: executable)))
  }
  mutating func symlink(_ name: [UInt8], target: [UInt8]) { add(Temp(name: name, kind: .symlink(target))) }

  /// Flattens; `contentOf` maps an ingest file index to its content ID.
  func nodes(contentOf: (Int) -> ContentID) -> [Manifest.Node] {
    guard let root else { return [] }
    var out: [Manifest.Node] = []
    var queue: [(Temp, UInt32)] = [(root, 0)]
    var head = 0
    // Reserve slots breadth-first: a directory's children get consecutive indices.
    var next = 1
    while head < queue.count {
      let (t, parent) = queue[head]
      let me = UInt32(head)
      head += 1
      let kind: Manifest.Kind
      switch t.kind {
      case .directory:
        kind = .directory(firstChild: UInt32(next), childCount: UInt32(t.children.count))
        next += t.children.count
        for c in t.children { queue.append((c, me)) }
      case .regular(let file, let size, let exec):
        kind = .regular(content: contentOf(file), size: size, executable: exec)
      case .symlink(let target):
        kind = .symlink(target: target)
      }
      out.append(Manifest.Node(name: t.name, parent: parent, kind: kind))
    }
    return out
  }
}
