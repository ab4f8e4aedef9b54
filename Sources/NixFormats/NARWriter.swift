/// Serialises `NAREvent`s into NAR bytes, byte-identical to `nix-store --dump` for the same tree.
/// Output accumulates in `output`; callers drain it with `take()` whenever they like.
public struct NARWriter {
  public private(set) var output: [UInt8] = []
  /// Bytes emitted so far, drained or not.
  public private(set) var offset: UInt64 = 0
  var depth = 0
  /// For each open directory, its last entry's name: the writer refuses to emit an invalid NAR.
  var lastNames: [[UInt8]] = []
  var started = false
  var finished = false
  var fileRemaining: UInt64? = nil
  var filePadding = 0

  public init() {}

  public var isComplete: Bool { finished }

  /// Returns and clears what was written so far.
  public mutating func take() -> [UInt8] {
    defer { output.removeAll(keepingCapacity: true) }
    return output
  }

  mutating func raw(_ bytes: UnsafeRawBufferPointer) {
    output.append(contentsOf: bytes)
    offset += UInt64(bytes.count)
  }

  mutating func u64(_ v: UInt64) {
    withUnsafeBytes(of: v.littleEndian) { raw($0) }
  }

  mutating func str(_ bytes: [UInt8]) {
    u64(UInt64(bytes.count))
    bytes.withUnsafeBytes { raw($0) }
    pad(bytes.count)
  }

  mutating func pad(_ count: Int) {
    let p = (8 - count % 8) % 8
    if p > 0 { withUnsafeBytes(of: UInt64(0)) { raw(UnsafeRawBufferPointer(rebasing: $0[0..<p])) } }
  }

  func misuse(_ why: String) -> NARError {
    NARError(kind: .writerMisuse(why), offset: offset, path: "")
  }

  /// Opens a node: the magic for the root, the entry header for a child.
  mutating func beginNode(name: [UInt8]) throws {
    if finished { throw misuse("node after the root was closed") }
    if fileRemaining != nil { throw misuse("node inside a file") }
    if !started {
      if !name.isEmpty { throw misuse("the root node has a name") }
      started = true
      str(NARToken.magic)
    } else {
      if depth == 0 { throw misuse("second root node") }
      if let why = name.withUnsafeBytes({ NARReader.nameProblem($0) }) { throw misuse("invalid name: \(why)") }
      let previous = lastNames[lastNames.count - 1]
      if !previous.isEmpty && !previous.lexicographicallyPrecedes(name) {
        throw misuse("entry '\(printable(name))' does not sort after '\(printable(previous))'")
      }
      lastNames[lastNames.count - 1] = name
      str(NARToken.entry)
      str(NARToken.open)
      str(NARToken.name)
      str(name)
      str(NARToken.node)
    }
    str(NARToken.open)
    str(NARToken.type)
  }

  /// Closes a node, and its entry when it has a parent.
  mutating func endNode() {
    str(NARToken.close)
    if depth > 0 { str(NARToken.close) } else { finished = true }
  }

  public mutating func write(_ event: NAREvent) throws {
    switch event {
    case .directory(let name):
      try beginNode(name: name)
      str(NARToken.directory)
      depth += 1
      lastNames.append([])
    case .endDirectory:
      guard depth > 0, fileRemaining == nil else { throw misuse("endDirectory without a directory") }
      depth -= 1
      lastNames.removeLast()
      endNode()
    case .file(let name, let size, let executable, _):
      try beginNode(name: name)
      str(NARToken.regular)
      if executable {
        str(NARToken.executable)
        str([])
      }
      str(NARToken.contents)
      u64(size)
      fileRemaining = size
      filePadding = Int(size % 8)
    case .data(let bytes):
      guard let remaining = fileRemaining, UInt64(bytes.count) <= remaining else {
        throw misuse("data outside a file or beyond its size")
      }
      raw(bytes)
      fileRemaining = remaining - UInt64(bytes.count)
    case .endFile:
      guard fileRemaining == 0 else { throw misuse("endFile before all of the file's bytes") }
      fileRemaining = nil
      pad(filePadding)
      endNode()
    case .symlink(let name, let target):
      try beginNode(name: name)
      if target.isEmpty || target.contains(0) { throw misuse("invalid symlink target") }
      str(NARToken.symlink)
      str(NARToken.target)
      str(target)
      endNode()
    }
  }
}
