/// What the kernel's node ids mean, kept on disk for the daemon that serves the same FUSE
/// connection next (after a takeover or a crash; see Handover.swift).
///
/// A node id names a tree instance (namespace, store path) by a number handed out in order, or a
/// file by 62 bits of its content digest; a view by its number. None of it can be recomputed from
/// the number alone, and the kernel keeps the numbers for as long as it caches an entry (for good:
/// the store is immutable). So every new number is appended here before the kernel learns it: one
/// small `write` (no fsync: only a kernel crash loses the page cache, and that ends the mount too).
/// A successor replays the file and compacts it. The header names the connection, so a record
/// from another mount is never applied to this one.
import ChunkStore
import Foundation
import NixFormats
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

/// The numbering the kernel depends on, as replayed from the journal.
package struct KernelViewState {
  package var instances: [UInt32: (namespace: UInt32, path: StorePath)] = [:]
  package var files: [UInt64: (content: ContentID, size: UInt64, path: StorePath)] = [:]
  package var views: [UInt32: StoreView] = [:]
  /// How many daemons served this connection before; handle numbers start from it.
  package var generation: UInt64 = 0
  /// The connection was set up with FUSE passthrough (the INIT reply said so).
  package var passthrough = false
  /// Files of passthrough-sized inodes the kernel holds open, by inode: how many opens, and the
  /// backing file they pass through to (none: read through the daemon). The kernel requires every
  /// open of an inode to use the mode and backing file of those still open.
  package var opens: [UInt64: OpenInode] = [:]
  package init() {}
}

package struct OpenInode: Sendable, Equatable {
  package var count: Int
  package var backing: Int32?
  package var content: ContentID?
  package init(count: Int, backing: Int32?, content: ContentID?) {
    (self.count, self.backing, self.content) = (count, backing, content)
  }
}

package struct KernelViewError: Error, CustomStringConvertible {
  package let path: String
  package let reason: String
  package var description: String { "kernel view \(path): \(reason)" }
}

package final class KernelViewJournal: @unchecked Sendable {
  package static let fileName = "kernel-view"
  package static let magic = "nixfs-kernel-view 1"

  package let path: String
  package let connection: String
  private let fd: Int32

  private init(path: String, connection: String, fd: Int32) {
    self.path = path
    self.connection = connection
    self.fd = fd
  }

  deinit { close(fd) }

  package static func path(stateDir: String) -> String { (stateDir as NSString).appendingPathComponent(fileName) }

  /// Writes a fresh journal holding `state` (empty for a new mount) and opens it for appending.
  /// Written beside and renamed into place, so a crash leaves the old one or the new one whole.
  package static func create(stateDir: String, connection: String, state: KernelViewState = .init()) throws
    -> KernelViewJournal
  {
    let path = path(stateDir: stateDir)
    let temporary = path + ".new"
    var bytes = Array("\(magic) \(connection) \(state.generation)\n".utf8)
    for (id, i) in state.instances.sorted(by: { $0.key < $1.key }) {
      bytes += record(instance: id, namespace: i.namespace, path: i.path)
    }
    for (number, v) in state.views.sorted(by: { $0.key < $1.key }) { bytes += record(view: number, v) }
    for (number, f) in state.files { bytes += record(file: number, content: f.content, size: f.size, path: f.path) }
    if state.passthrough { bytes += frame("N", [1]) }
    for (ino, o) in state.opens {
      for _ in 0..<o.count { bytes += record(open: ino, backing: o.backing, content: o.content) }
    }
    let out = open(temporary, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
    guard out >= 0 else { throw KernelViewError(path: temporary, reason: String(cString: strerror(errno))) }
    defer { close(out) }
    do { try writeAll(out, bytes) } catch { throw KernelViewError(path: temporary, reason: "\(error)") }
    guard rename(temporary, path) == 0 else { throw KernelViewError(path: path, reason: String(cString: strerror(errno))) }
    let fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)
    guard fd >= 0 else { throw KernelViewError(path: path, reason: String(cString: strerror(errno))) }
    return KernelViewJournal(path: path, connection: connection, fd: fd)
  }

  /// Replays the journal of `connection`. A torn last record (a crash mid-write) is ignored.
  package static func load(stateDir: String, connection: String, storeDir: String) throws -> KernelViewState {
    let path = path(stateDir: stateDir)
    guard let data = FileManager.default.contents(atPath: path) else {
      throw KernelViewError(path: path, reason: "missing (the state directory is not the one this mount was made with)")
    }
    let bytes = [UInt8](data)
    guard let newline = bytes.firstIndex(of: 0x0a) else { throw KernelViewError(path: path, reason: "no header") }
    let header = String(decoding: bytes[..<newline], as: UTF8.self).split(separator: " ")
    guard header.count == 4, "\(header[0]) \(header[1])" == magic, let generation = UInt64(header[3]) else {
      throw KernelViewError(path: path, reason: "unknown format")
    }
    guard header[2] == connection else {
      throw KernelViewError(path: path, reason: "it belongs to connection \(header[2]), not \(connection)")
    }
    var state = KernelViewState()
    state.generation = generation
    var offset = newline + 1
    while offset + 5 <= bytes.count {
      let kind = bytes[offset]
      let length = Int(UInt32(le: bytes, at: offset + 1))
      let start = offset + 5
      guard start + length <= bytes.count else { break }
      let body = Array(bytes[start..<start + length])
      offset = start + length
      func name(_ from: Int) -> StorePath? {
        try? StorePath(baseName: String(decoding: body[from...], as: UTF8.self), storeDir: storeDir)
      }
      switch kind {
      case UInt8(ascii: "I") where body.count > 8:
        guard let p = name(8) else { continue }
        state.instances[UInt32(le: body, at: 0)] = (UInt32(le: body, at: 4), p)
      case UInt8(ascii: "F") where body.count > 48:
        guard let p = name(48) else { continue }
        state.files[UInt64(le: body, at: 0)] = (ContentID(bytes: body[8..<40]), UInt64(le: body, at: 40), p)
      case UInt8(ascii: "V") where body.count > 4:
        guard let v = try? JSONDecoder().decode(ViewRecord.self, from: Data(body[4...])),
          let closure = try? v.closure.map({ try StorePath(baseName: $0, storeDir: storeDir) }),
          let result = try? StorePath(baseName: v.result, storeDir: storeDir)
        else { continue }
        state.views[UInt32(le: body, at: 0)] = StoreView(id: v.id, closure: closure, result: result)
      case UInt8(ascii: "N"):
        state.passthrough = true
      case UInt8(ascii: "O") where body.count == 8:
        state.opens[UInt64(le: body, at: 0), default: OpenInode(count: 0, backing: nil, content: nil)].count += 1
      case UInt8(ascii: "P") where body.count == 44:
        let ino = UInt64(le: body, at: 0)
        var o = state.opens[ino] ?? OpenInode(count: 0, backing: nil, content: nil)
        o.count += 1
        o.backing = Int32(bitPattern: UInt32(le: body, at: 8))
        o.content = ContentID(bytes: body[12..<44])
        state.opens[ino] = o
      case UInt8(ascii: "X") where body.count == 8:
        let ino = UInt64(le: body, at: 0)
        if var o = state.opens[ino] {
          o.count -= 1
          state.opens[ino] = o.count > 0 ? o : nil
        }
      case UInt8(ascii: "R") where body.count == 4:
        let number = UInt32(le: body, at: 0)
        state.views[number] = nil
        state.instances = state.instances.filter { $0.value.namespace != number }
      default:
        continue
      }
    }
    return state
  }

  package struct ViewRecord: Codable {
    let id: String
    let closure: [String]
    let result: String
  }

  // Each returns the error when the record could not be written: a full disk costs the
  // successor its knowledge of this number (the kernel's entries for it then answer ESTALE there),
  // not this request; the caller says so in the log.
  @discardableResult
  package func instance(_ id: UInt32, namespace: UInt32, path: StorePath) -> SystemCallError? {
    append(Self.record(instance: id, namespace: namespace, path: path))
  }

  @discardableResult
  package func file(_ number: UInt64, content: ContentID, size: UInt64, path: StorePath) -> SystemCallError? {
    append(Self.record(file: number, content: content, size: size, path: path))
  }

  @discardableResult
  package func view(_ number: UInt32, _ view: StoreView) -> SystemCallError? { append(Self.record(view: number, view)) }

  @discardableResult
  package func passthroughNegotiated() -> SystemCallError? { append(Self.frame("N", [1])) }

  @discardableResult
  package func opened(_ ino: UInt64, backing: Int32?, content: ContentID?) -> SystemCallError? {
    append(Self.record(open: ino, backing: backing, content: content))
  }

  @discardableResult
  package func released(_ ino: UInt64) -> SystemCallError? { append(Self.frame("X", ino.le)) }

  package static func record(open ino: UInt64, backing: Int32?, content: ContentID?) -> [UInt8] {
    if let backing, let content { return frame("P", ino.le + UInt32(bitPattern: backing).le + content.bytes) }
    return frame("O", ino.le)
  }

  @discardableResult
  package func viewRemoved(_ number: UInt32) -> SystemCallError? { append(Self.frame("R", number.le)) }

  private func append(_ record: [UInt8]) -> SystemCallError? {
    do throws(SystemCallError) {
      try writeAll(fd, record)
      return nil
    } catch {
      return error
    }
  }

  package static func record(instance id: UInt32, namespace: UInt32, path: StorePath) -> [UInt8] {
    frame("I", id.le + namespace.le + Array(path.baseName.utf8))
  }

  package static func record(file number: UInt64, content: ContentID, size: UInt64, path: StorePath) -> [UInt8] {
    frame("F", number.le + content.bytes + size.le + Array(path.baseName.utf8))
  }

  package static func record(view number: UInt32, _ view: StoreView) -> [UInt8] {
    let v = ViewRecord(id: view.id, closure: view.closure.map(\.baseName), result: view.result.baseName)
    return frame("V", number.le + [UInt8]((try? JSONEncoder().encode(v)) ?? Data()))
  }

  package static func frame(_ kind: Unicode.Scalar, _ body: [UInt8]) -> [UInt8] {
    [UInt8(ascii: kind)] + UInt32(body.count).le + body
  }
}

extension FixedWidthInteger {
  package var le: [UInt8] { withUnsafeBytes(of: self.littleEndian) { Array($0) } }

  package init(le bytes: [UInt8], at offset: Int) {
    var v = Self.zero
    for i in 0..<MemoryLayout<Self>.size { v |= Self(bytes[offset + i]) << (8 * i) }
    self = v
  }
}
