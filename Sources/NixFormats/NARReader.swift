/// A strict, streaming NAR parser. Feed it bytes in pieces of any size; it calls back with
/// `NAREvent`s. Memory is constant whatever the file sizes: file contents are handed through as
/// slices of the input, never copied or buffered.
public struct NARReader {
  /// Grammar positions: what the next string must be.
  enum Expect: Equatable {
    case magic, open, type, typeValue
    case regularAttribute  // "executable" or "contents"
    case executableValue  // ""
    case contentsKeyword  // "contents" after "executable"
    case contents  // the content string itself (streamed)
    case closeNode  // ")" ending a regular file or symlink
    case targetKeyword, targetValue
    case entryOrClose  // "entry" or ")" in a directory
    case entryOpen, nameKeyword, nameValue, nodeKeyword
    case entryClose  // ")" ending an entry
    case done
  }

  enum Lex {
    case length
    case token(length: Int)
    case content(remaining: UInt64)
    case contentPadding(remaining: Int)
  }

  public let maxDepth: Int
  public let maxSymlinkTarget: Int
  /// When known (a narinfo's NarSize), lengths past it fail at once.
  public let totalSize: UInt64?

  /// Bytes consumed so far.
  public private(set) var offset: UInt64 = 0
  public var isComplete: Bool { expect == .done }

  var expect: Expect = .magic
  var lex: Lex = .length
  var lengthBytes: UInt64 = 0
  var lengthHave = 0
  var tokenBuffer: [UInt8] = []
  var tokenStart: UInt64 = 0
  var executable = false
  var contentPaddingStart: Int = 0
  /// Names from the root to the current node.
  var path: [[UInt8]] = []
  /// For each open directory, the name of its last entry (empty before the first).
  var lastNames: [[UInt8]] = []
  var pendingName: [UInt8] = []

  public init(maxDepth: Int = 256, maxSymlinkTarget: Int = 4095, totalSize: UInt64? = nil) {
    self.maxDepth = maxDepth
    self.maxSymlinkTarget = maxSymlinkTarget
    self.totalSize = totalSize
  }

  public var currentPath: String {
    path.isEmpty ? "/" : path.map { printable($0, limit: 255) }.map { "/" + $0 }.joined()
  }

  func error(_ kind: NARError.Kind, at offset: UInt64? = nil) -> NARError {
    NARError(kind: kind, offset: offset ?? tokenStart, path: currentPath)
  }

  public mutating func feed(_ bytes: [UInt8], _ handler: (NAREvent) throws -> Void) throws {
    try bytes.withUnsafeBytes { try feed($0, handler) }
  }

  public mutating func feed(_ buffer: UnsafeRawBufferPointer, _ handler: (NAREvent) throws -> Void) throws {
    let n = buffer.count
    var i = 0
    while i < n {
      switch lex {
      case .length:
        if expect == .done {
          throw error(.trailingBytes, at: offset)
        }
        let length: UInt64
        if lengthHave == 0 && n - i >= 8 {
          tokenStart = offset
          length = UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: i, as: UInt64.self))
          i += 8
          offset += 8
        } else {
          if lengthHave == 0 { tokenStart = offset }
          while lengthHave < 8 && i < n {
            lengthBytes |= UInt64(buffer[i]) << UInt64(8 * lengthHave)
            lengthHave += 1
            i += 1
            offset += 1
          }
          if lengthHave < 8 { return }
          length = lengthBytes
          lengthBytes = 0
          lengthHave = 0
        }
        try begin(length: length, handler)

      case .token(let length):
        let padded = (length + 7) & ~7
        if tokenBuffer.isEmpty && n - i >= padded {
          let token = UnsafeRawBufferPointer(rebasing: buffer[i..<i + length])
          try checkPadding(UnsafeRawBufferPointer(rebasing: buffer[i + length..<i + padded]), at: offset + UInt64(length))
          i += padded
          offset += UInt64(padded)
          lex = .length
          try dispatch(token, handler)
        } else {
          let take = min(padded - tokenBuffer.count, n - i)
          tokenBuffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[i..<i + take]))
          i += take
          offset += UInt64(take)
          if tokenBuffer.count < padded { return }
          let paddingOffset = offset - UInt64(padded - length)
          let tokenBytes = tokenBuffer
          tokenBuffer.removeAll(keepingCapacity: true)
          try tokenBytes.withUnsafeBytes { all in
            try checkPadding(UnsafeRawBufferPointer(rebasing: all[length..<padded]), at: paddingOffset)
            lex = .length
            try dispatch(UnsafeRawBufferPointer(rebasing: all[0..<length]), handler)
          }
        }

      case .content(let remaining):
        let take = Int(min(remaining, UInt64(n - i)))
        try handler(.data(UnsafeRawBufferPointer(rebasing: buffer[i..<i + take])))
        i += take
        offset += UInt64(take)
        let left = remaining - UInt64(take)
        lex = left == 0 ? .contentPadding(remaining: contentPaddingStart) : .content(remaining: left)
        if left == 0 && contentPaddingStart == 0 { try endContent(handler) }

      case .contentPadding(let remaining):
        let take = min(remaining, n - i)
        try checkPadding(UnsafeRawBufferPointer(rebasing: buffer[i..<i + take]), at: offset)
        i += take
        offset += UInt64(take)
        if take == remaining {
          try endContent(handler)
        } else {
          lex = .contentPadding(remaining: remaining - take)
        }
      }
    }
  }

  /// Call after the last byte: throws unless the archive is complete.
  public func finish() throws {
    guard expect == .done, case .length = lex, lengthHave == 0 else {
      throw error(.truncated, at: offset)
    }
  }

  mutating func endContent(_ handler: (NAREvent) throws -> Void) throws {
    lex = .length
    expect = .closeNode
    try handler(.endFile)
  }

  func checkPadding(_ bytes: UnsafeRawBufferPointer, at start: UInt64) throws {
    for (k, b) in bytes.enumerated() where b != 0 {
      throw error(.nonZeroPadding, at: start + UInt64(k))
    }
  }

  func limit(for expect: Expect) -> Int {
    switch expect {
    case .nameValue: 255
    case .targetValue: maxSymlinkTarget
    case .executableValue: 0
    default: 16  // the longest keyword is "nix-archive-1"
    }
  }

  mutating func begin(length: UInt64, _ handler: (NAREvent) throws -> Void) throws {
    let padding = (8 - length % 8) % 8
    if let total = totalSize {
      let (end, overflow) = offset.addingReportingOverflow(length)
      if overflow || end > total || total - end < padding {
        throw error(.lengthPastEnd(length: length))
      }
    }
    if expect == .contents {
      if offset.addingReportingOverflow(length).overflow || offset.addingReportingOverflow(length + padding).overflow {
        throw error(.lengthPastEnd(length: length))
      }
      try handler(.file(name: path.last ?? [], size: length, executable: executable, contentOffset: offset))
      contentPaddingStart = Int(padding)
      if length == 0 {
        // An empty file has no padding either.
        try endContent(handler)
      } else {
        lex = .content(remaining: length)
      }
      return
    }
    let max = limit(for: expect)
    guard length <= UInt64(max) else {
      switch expect {
      case .nameValue: throw error(.invalidName("longer than 255 bytes (\(length))"))
      case .executableValue: throw error(.nonEmptyExecutableValue)
      case .targetValue: throw error(.stringTooLong(length: length, limit: UInt64(max)))
      default: throw error(.unexpectedToken(expected: describe(expect), found: "a string of \(length) bytes"))
      }
    }
    lex = .token(length: Int(length))
    if length == 0 {
      lex = .length
      try dispatch(UnsafeRawBufferPointer(start: nil, count: 0), handler)
    }
  }

  func describe(_ e: Expect) -> String {
    switch e {
    case .magic: "'nix-archive-1'"
    case .open, .entryOpen: "'('"
    case .type: "'type'"
    case .typeValue: "'regular', 'symlink' or 'directory'"
    case .regularAttribute: "'executable' or 'contents'"
    case .executableValue: "''"
    case .contentsKeyword: "'contents'"
    case .contents: "file contents"
    case .closeNode, .entryClose: "')'"
    case .targetKeyword: "'target'"
    case .targetValue: "a symlink target"
    case .entryOrClose: "'entry' or ')'"
    case .nameKeyword: "'name'"
    case .nameValue: "an entry name"
    case .nodeKeyword: "'node'"
    case .done: "end of archive"
    }
  }

  func unexpected(_ token: UnsafeRawBufferPointer) -> NARError {
    error(.unexpectedToken(expected: describe(expect), found: "'\(printable(token))'"))
  }

  mutating func expectToken(_ token: UnsafeRawBufferPointer, _ wanted: [UInt8], then next: Expect) throws {
    guard token.equals(wanted) else { throw unexpected(token) }
    expect = next
  }

  /// The current node (file or symlink) is finished: go back to its parent.
  mutating func closeNode() {
    if path.isEmpty {
      expect = .done
    } else {
      path.removeLast()
      expect = .entryClose
    }
  }

  mutating func dispatch(_ token: UnsafeRawBufferPointer, _ handler: (NAREvent) throws -> Void) throws {
    switch expect {
    case .magic:
      guard token.equals(NARToken.magic) else { throw error(.badMagic) }
      expect = .open
    case .open:
      try expectToken(token, NARToken.open, then: .type)
    case .type:
      try expectToken(token, NARToken.type, then: .typeValue)
    case .typeValue:
      if token.equals(NARToken.regular) {
        executable = false
        expect = .regularAttribute
      } else if token.equals(NARToken.symlink) {
        expect = .targetKeyword
      } else if token.equals(NARToken.directory) {
        lastNames.append([])
        expect = .entryOrClose
        try handler(.directory(name: path.last ?? []))
      } else {
        throw unexpected(token)
      }
    case .regularAttribute:
      if token.equals(NARToken.executable) {
        executable = true
        expect = .executableValue
      } else {
        try expectToken(token, NARToken.contents, then: .contents)
      }
    case .executableValue:
      guard token.count == 0 else { throw error(.nonEmptyExecutableValue) }
      expect = .contentsKeyword
    case .contentsKeyword:
      try expectToken(token, NARToken.contents, then: .contents)
    case .contents:
      preconditionFailure("contents are streamed, not dispatched")
    case .closeNode:
      guard token.equals(NARToken.close) else { throw unexpected(token) }
      closeNode()
    case .targetKeyword:
      try expectToken(token, NARToken.target, then: .targetValue)
    case .targetValue:
      if token.count == 0 { throw error(.invalidSymlinkTarget("empty")) }
      if token.contains(0) { throw error(.invalidSymlinkTarget("contains NUL")) }
      expect = .closeNode
      try handler(.symlink(name: path.last ?? [], target: Array(token)))
    case .entryOrClose:
      if token.equals(NARToken.entry) {
        expect = .entryOpen
      } else if token.equals(NARToken.close) {
        lastNames.removeLast()
        try handler(.endDirectory)
        closeNode()
      } else {
        throw unexpected(token)
      }
    case .entryOpen:
      try expectToken(token, NARToken.open, then: .nameKeyword)
    case .nameKeyword:
      try expectToken(token, NARToken.name, then: .nameValue)
    case .nameValue:
      if let why = Self.nameProblem(token) { throw error(.invalidName(why)) }
      let name = Array(token)
      let previous = lastNames[lastNames.count - 1]
      if !previous.isEmpty && !previous.lexicographicallyPrecedes(name) {
        throw error(.entriesNotSorted(previous: printable(previous), name: printable(name)))
      }
      lastNames[lastNames.count - 1] = name
      pendingName = name
      expect = .nodeKeyword
    case .nodeKeyword:
      guard token.equals(NARToken.node) else { throw unexpected(token) }
      if path.count >= maxDepth { throw error(.tooDeep(limit: maxDepth)) }
      path.append(pendingName)
      expect = .open
    case .entryClose:
      guard token.equals(NARToken.close) else { throw unexpected(token) }
      expect = .entryOrClose
    case .done:
      throw error(.trailingBytes)
    }
  }

  static func nameProblem(_ name: UnsafeRawBufferPointer) -> String? {
    if name.isEmpty { return "empty" }
    if name.count == 1 && name[0] == UInt8(ascii: ".") { return "'.'" }
    if name.count == 2 && name[0] == UInt8(ascii: ".") && name[1] == UInt8(ascii: ".") { return "'..'" }
    if name.contains(UInt8(ascii: "/")) { return "'\(printable(name))' contains '/'" }
    if name.contains(0) { return "'\(printable(name))' contains NUL" }
    return nil
  }
}

extension NARReader {
  /// Parses a whole in-memory NAR.
  public static func parse(_ bytes: [UInt8], _ handler: (NAREvent) throws -> Void) throws {
    var reader = NARReader(totalSize: UInt64(bytes.count))
    try reader.feed(bytes, handler)
    try reader.finish()
  }
}
