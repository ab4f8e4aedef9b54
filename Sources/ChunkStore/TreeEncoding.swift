import Foundation
import NixFormats

/// The compact binary form of a tree, as kept in the index.
extension Manifest {
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
        kind = .regular(content: ContentID(bytes: d), size: size, executable: tag == 2)
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
