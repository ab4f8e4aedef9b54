import NixFormats

/// The immutable tree of one complete store path, as the filesystem walks it.
/// Node 0 is the root; directory entries are sorted bytewise, as in the NAR.
public final class PathTree: Sendable {
  public enum Node: Sendable {
    case directory(entries: [Entry])
    /// `content` identifies the file's bytes across all store paths (same bytes, same id) and is
    /// stable for the life of the store: the filesystem derives the inode from it.
    case file(content: UInt64, size: UInt64, executable: Bool)
    case symlink(target: [UInt8])
  }

  public struct Entry: Sendable {
    public let name: [UInt8]
    public let node: Int32
    public init(name: [UInt8], node: Int32) {
      self.name = name
      self.node = node
    }
  }

  public let path: StorePath
  public let nodes: [Node]

  public init(path: StorePath, nodes: [Node]) {
    self.path = path
    self.nodes = nodes
  }

  /// Binary search of a directory's sorted entries.
  func child(of node: Int32, named name: UnsafeRawBufferPointer) -> Int32? {
    guard case .directory(let entries) = nodes[Int(node)] else { return nil }
    var lo = 0
    var hi = entries.count
    while lo < hi {
      let mid = (lo + hi) / 2
      let c = compare(entries[mid].name, name)
      if c == 0 { return entries[mid].node }
      if c < 0 { lo = mid + 1 } else { hi = mid }
    }
    return nil
  }

  private func compare(_ a: [UInt8], _ b: UnsafeRawBufferPointer) -> Int {
    a.withUnsafeBytes { ab in
      let n = min(ab.count, b.count)
      if n > 0 {
        let r = memcmp(ab.baseAddress!, b.baseAddress!, n)
        if r != 0 { return Int(r) }
      }
      return ab.count - b.count
    }
  }
}

/// What the filesystem needs from the node's local store (the chunk store).
public protocol LocalStore: Sendable {
  /// The tree of a complete path, or nil when the path is not (or no longer) here.
  func tree(of path: StorePath) throws -> PathTree?
  /// Every complete path, for listing the store directory.
  func completePaths() throws -> [StorePath]
  /// Reads up to `buffer.count` bytes of a file's content at `offset`; returns the count read.
  func read(content: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
  /// Keeps `path` from garbage collection while the filesystem serves it (nested calls count).
  func pin(_ path: StorePath)
  func unpin(_ path: StorePath)
}

/// Why a path could not be materialised, as the filesystem reports it to the kernel.
public enum MaterialiseFailure: Error, Sendable {
  /// No cache has it (ENOENT; cached negatively).
  case notFound(String)
  /// Anything else: untrusted, hash mismatch, unreachable, stalled (EIO; not cached).
  case failed(String)
}

/// Fetches, verifies and ingests a store path into the local store.
public protocol Materialiser: Sendable {
  /// Returns once the path is complete in the local store; throws `MaterialiseFailure`.
  func materialise(_ path: StorePath) async throws
}

#if canImport(Glibc)
  import Glibc
#endif
