import Foundation
import NixFormats

/// What a store holds of a path (see `ChunkStore.localState(of:)`).
public enum LocalPath: Sendable, Equatable {
  case absent
  case complete
  /// Tree and chunk lists from a verified chunk index; chunks come as they are read.
  case partial(row: Int64)
  /// Known, but its data is gone (fsck removed a bad chunk): fetch it again.
  case incomplete
}

extension ChunkStore {
  public func isComplete(_ path: StorePath) -> Bool {
    (try? withReader { db in try db.isPathComplete(path.path) }) ?? false
  }

  public func completePaths() -> [StorePath] { paths(states: "1") }

  /// Complete and partial paths: what the mount lists.
  public func servablePaths() -> [StorePath] { paths(states: "1, 3") }

  public func isPartial(_ path: StorePath) -> Bool {
    if case .partial = try? localState(of: path) { true } else { false }
  }

  /// What this store holds of a path, in one query: a materialiser asks it once on a miss and
  /// hands the answer to `ingest` instead of that asking again.
  public func localState(of path: StorePath) throws(ChunkStoreError) -> LocalPath {
    let found = try wrap("path state") { try withReader { db in try db.pathRow(path.path) } }
    guard let found else { return .absent }
    switch PathState(rawValue: found.state) {
    case .complete: return .complete
    case .partial: return .partial(row: found.row)
    case .incomplete, nil: return .incomplete
    }
  }

  func partialRow(_ path: String) throws(ChunkStoreError) -> Int64? {
    try wrap("path state") {
      try withReader { db in try db.partialPathRow(path) }
    }
  }

  func paths(states: String) -> [StorePath] {
    (try? withReader { db in try db.storePaths(states: states).compactMap { try? StorePath($0) } }) ?? []
  }

  // The serve's queries throw when the index cannot answer: a failing index must not read as
  // "not held" (the serve would pull the path through again).

  /// The complete path with this hash part, if the store holds one (a binary cache is asked by
  /// hash part alone). A range scan of the unique index: `-` sorts just below `.`.
  public func completePath(hashPart: String, storeDir: String = StorePath.defaultStoreDir) throws(ChunkStoreError) -> StorePath? {
    let low = "\(storeDir)/\(hashPart)-"
    let high = "\(storeDir)/\(hashPart)."
    return try wrap("path by hash part") {
      try withReader { db in try db.completeStorePath(from: low, below: high).flatMap { try? StorePath($0, storeDir: storeDir) } }
    }
  }

  /// A complete path with this NarHash (`sha256:<nix32>`), if any.
  public func completePath(narHash: String) throws(ChunkStoreError) -> StorePath? {
    try wrap("path by NarHash") { try withReader { db in try db.completeStorePath(narHash: narHash).flatMap { try? StorePath($0) } } }
  }

  /// What a narinfo says of a complete path (no tree): NarHash, NarSize, references, signatures.
  public func pathInfo(of path: StorePath) throws(ChunkStoreError) -> PathInfo? {
    try wrap("path info") { try withReader { db in try db.completePathInfo(path.path) } }
  }

  /// Paths whose data was found bad by fsck: the fetcher should fetch them again.
  public func incompletePaths() -> [String] {
    (try? withReader { db in try db.incompleteStorePaths() }) ?? []
  }

  /// The tree and metadata of a complete path, without chunk lists.
  public func tree(of path: StorePath) throws(ChunkStoreError) -> Manifest? { try tree(of: path, states: "1") }

  /// The tree of a path the filesystem can serve: complete, or partial (chunks fetched on read).
  public func servableTree(of path: StorePath) throws(ChunkStoreError) -> Manifest? { try tree(of: path, states: "1, 3") }

  func tree(of path: StorePath, states: String) throws(ChunkStoreError) -> Manifest? {
    do {
      return try withReader { db -> Manifest? in
        guard let row = try db.pathTree(path.path, states: states) else { return nil }
        guard let info = row.info, let blob = row.tree, let nodes = Manifest.decodeTree(blob) else {
          throw ChunkStoreError.manifestCorrupt(storePath: path.path, reason: "undecodable row")
        }
        return Manifest(info: info, nodes: nodes, chunks: [:])
      }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "tree", message: "\(error)") }
  }

  /// The full manifest (tree, metadata and every content's chunk list) of a complete path.
  public func manifest(of path: StorePath) throws(ChunkStoreError) -> Manifest? {
    guard var m = try tree(of: path) else { return nil }
    for (content, _) in m.contents {
      let layout = try self.layout(content)
      m.chunks[content] = layout.refs
      m.slices[content] = layout.slice
    }
    return m
  }

  /// Partial paths, counted (for the daemon's gauges).
  public func partialPathCount() -> Int {
    (try? withReader { db in try db.countPaths(state: PathState.partial.rawValue) }) ?? 0
  }
}
