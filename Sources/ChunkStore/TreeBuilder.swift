import Foundation
import NixFormats

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
