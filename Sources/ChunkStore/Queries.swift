import Foundation
import NixFormats

extension ChunkStore {
  public func isComplete(_ path: String) -> Bool {
    (try? withReader { db in
      try db.prepare("SELECT 1 FROM paths WHERE store_path = ? AND state = 1").bind(path).step()
    }) ?? false
  }
  public func isComplete(_ path: StorePath) -> Bool { isComplete(path.path) }

  public func completePaths() -> [StorePath] { paths(states: "1") }

  /// Complete and partial paths: what the mount lists.
  public func servablePaths() -> [StorePath] { paths(states: "1, 3") }

  public func isPartial(_ path: StorePath) -> Bool { (try? partialRow(path.path)) != nil }

  func partialRow(_ path: String) throws(ChunkStoreError) -> Int64? {
    try wrap("path state") {
      try withReader { db in
        let s = try db.prepare("SELECT id FROM paths WHERE store_path = ? AND state = 3").bind(path)
        return try s.step() ? s.int(0) : nil
      }
    }
  }

  func paths(states: String) -> [StorePath] {
    (try? withReader { db in
      let s = try db.prepare("SELECT store_path FROM paths WHERE state IN (\(states)) ORDER BY store_path")
      var out: [StorePath] = []
      while try s.step() { if let t = s.text(0), let p = try? StorePath(t) { out.append(p) } }
      return out
    }) ?? []
  }

  /// The complete path with this hash part, if the store holds one (a binary cache is asked by
  /// hash part alone). A range scan of the unique index: `-` sorts just below `.`.
  public func completePath(hashPart: String, storeDir: String = StorePath.defaultStoreDir) -> StorePath? {
    let low = "\(storeDir)/\(hashPart)-"
    let high = "\(storeDir)/\(hashPart)."
    return (try? withReader { db in
      let s = try db.prepare("SELECT store_path FROM paths WHERE store_path >= ? AND store_path < ? AND state = 1 LIMIT 1")
        .bind(low, high)
      return try s.step() ? s.text(0).flatMap { try? StorePath($0, storeDir: storeDir) } : nil
    }) ?? nil
  }

  /// A complete path with this NarHash (`sha256:<nix32>`), if any.
  public func completePath(narHash: String) -> StorePath? {
    (try? withReader { db in
      let s = try db.prepare("SELECT store_path FROM paths WHERE nar_hash = ? AND state = 1 LIMIT 1").bind(narHash)
      return try s.step() ? s.text(0).flatMap { try? StorePath($0) } : nil
    }) ?? nil
  }

  /// What a narinfo says of a complete path (no tree): NarHash, NarSize, references, signatures.
  public func pathInfo(of path: StorePath) -> PathInfo? {
    (try? withReader { db in
      let s = try db.prepare(
        "SELECT store_path, nar_hash, nar_size, refs, deriver, sigs, ca FROM paths WHERE store_path = ? AND state = 1"
      ).bind(path.path)
      return try s.step() ? info(from: s, at: 0) : nil
    }) ?? nil
  }

  /// Paths whose data was found bad by fsck: the fetcher should fetch them again.
  public func incompletePaths() -> [String] {
    (try? withReader { db in
      let s = try db.prepare("SELECT store_path FROM paths WHERE state = 2 ORDER BY store_path")
      var out: [String] = []
      while try s.step() { if let t = s.text(0) { out.append(t) } }
      return out
    }) ?? []
  }

  func info(from s: Statement, at c: Int32) -> PathInfo? {
    guard let p = s.text(c), let sp = try? StorePath(p), let h = s.text(c + 1), let hash = try? NixHash(parsing: h) else {
      return nil
    }
    let refs = (s.text(c + 3) ?? "").split(separator: " ").compactMap { try? StorePath(baseName: String($0)) }
    let sigs = (s.text(c + 5) ?? "").split(separator: "\n").map(String.init)
    return PathInfo(
      storePath: sp, narHash: hash, narSize: UInt64(s.int(c + 2)), references: refs, deriver: s.text(c + 4),
      signatures: sigs, ca: s.text(c + 6))
  }

  /// The tree and metadata of a complete path, without chunk lists.
  public func tree(of path: StorePath) throws(ChunkStoreError) -> Manifest? { try tree(of: path, states: "1") }

  /// The tree of a path the filesystem can serve: complete, or partial (chunks fetched on read).
  public func servableTree(of path: StorePath) throws(ChunkStoreError) -> Manifest? { try tree(of: path, states: "1, 3") }

  func tree(of path: StorePath, states: String) throws(ChunkStoreError) -> Manifest? {
    do {
      return try withReader { db -> Manifest? in
        let s = try db.prepare(
          "SELECT store_path, nar_hash, nar_size, refs, deriver, sigs, ca, tree FROM paths WHERE store_path = ? AND state IN (\(states))"
        ).bind(path.path)
        guard try s.step() else { return nil }
        guard let info = info(from: s, at: 0), let blob = s.blob(7), let nodes = Manifest.decodeTree(blob) else {
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
    (try? withReader { db in
      let s = try db.prepare("SELECT COUNT(*) FROM paths WHERE state = 3")
      return try s.step() ? Int(s.int(0)) : 0
    }) ?? 0
  }
}
