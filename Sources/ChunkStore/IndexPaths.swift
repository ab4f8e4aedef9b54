import Foundation
import NixFormats

// The index layer, `paths` table: each statement on store paths behind a named method, so the
// store's concern files say what they ask, not how. States are `ChunkStore.PathState` values;
// `states` is an SQL list of them.
extension Database {
  func isPathComplete(_ path: String) throws(ChunkStoreError) -> Bool {
    try prepare("SELECT 1 FROM paths WHERE store_path = ? AND state = 1").bind(path).step()
  }

  func partialPathRow(_ path: String) throws(ChunkStoreError) -> Int64? {
    let s = try prepare("SELECT id FROM paths WHERE store_path = ? AND state = 3").bind(path)
    return try s.step() ? s.int(0) : nil
  }

  /// Complete or partial (what `remove` may take).
  func servablePathRow(_ path: String) throws(ChunkStoreError) -> Int64? {
    let s = try prepare("SELECT id FROM paths WHERE store_path = ? AND state IN (1, 3)").bind(path)
    return try s.step() ? s.int(0) : nil
  }

  /// The row and state of a path the index knows.
  func pathRow(_ path: String) throws(ChunkStoreError) -> (row: Int64, state: Int64)? {
    let s = try prepare("SELECT id, state FROM paths WHERE store_path = ?").bind(path)
    return try s.step() ? (s.int(0), s.int(1)) : nil
  }

  func pathState(_ path: String) throws(ChunkStoreError) -> Int64? {
    let s = try prepare("SELECT state FROM paths WHERE store_path = ?").bind(path)
    return try s.step() ? s.int(0) : nil
  }

  func storePaths(states: String) throws(ChunkStoreError) -> [String] {
    let s = try prepare("SELECT store_path FROM paths WHERE state IN (\(states)) ORDER BY store_path")
    var out: [String] = []
    while try s.step() { if let t = s.text(0) { out.append(t) } }
    return out
  }

  func incompleteStorePaths() throws(ChunkStoreError) -> [String] {
    let s = try prepare("SELECT store_path FROM paths WHERE state = 2 ORDER BY store_path")
    var out: [String] = []
    while try s.step() { if let t = s.text(0) { out.append(t) } }
    return out
  }

  /// The first complete path in [low, high) by name.
  func completeStorePath(from low: String, below high: String) throws(ChunkStoreError) -> String? {
    let s = try prepare("SELECT store_path FROM paths WHERE store_path >= ? AND store_path < ? AND state = 1 LIMIT 1")
      .bind(low, high)
    return try s.step() ? s.text(0) : nil
  }

  func completeStorePath(narHash: String) throws(ChunkStoreError) -> String? {
    let s = try prepare("SELECT store_path FROM paths WHERE nar_hash = ? AND state = 1 LIMIT 1").bind(narHash)
    return try s.step() ? s.text(0) : nil
  }

  func completePathInfo(_ path: String) throws(ChunkStoreError) -> PathInfo? {
    let s = try prepare(
      "SELECT store_path, nar_hash, nar_size, refs, deriver, sigs, ca FROM paths WHERE store_path = ? AND state = 1"
    ).bind(path)
    return try s.step() ? s.pathInfo(at: 0) : nil
  }

  /// A path's narinfo facts (nil if they do not parse) and encoded tree; nil when no such row.
  func pathTree(_ path: String, states: String) throws(ChunkStoreError) -> (info: PathInfo?, tree: [UInt8]?)? {
    let s = try prepare(
      "SELECT store_path, nar_hash, nar_size, refs, deriver, sigs, ca, tree FROM paths WHERE store_path = ? AND state IN (\(states))"
    ).bind(path)
    guard try s.step() else { return nil }
    return (s.pathInfo(at: 0), s.blob(7))
  }

  /// The tree of a complete or partial path's row (empty if it does not decode); nil when gone.
  func servableTree(row: Int64) throws(ChunkStoreError) -> [Manifest.Node]? {
    let s = try prepare("SELECT tree FROM paths WHERE id = ? AND state IN (1, 3)").bind(row)
    guard try s.step() else { return nil }
    return s.blob(0).flatMap(Manifest.decodeTree) ?? []
  }

  /// The trees of every complete or partial path (empty where one does not decode).
  func servableTrees() throws(ChunkStoreError) -> [[Manifest.Node]] {
    let t = try prepare("SELECT tree FROM paths WHERE state IN (1, 3)")
    var out: [[Manifest.Node]] = []
    while try t.step() { out.append(t.blob(0).flatMap(Manifest.decodeTree) ?? []) }
    return out
  }

  /// Every complete or partial path, least recently used first: GC's candidates.
  func pathsByLastAccess() throws(ChunkStoreError) -> [(row: Int64, path: String)] {
    let s = try prepare("SELECT id, store_path FROM paths WHERE state IN (1, 3) ORDER BY last_access, id")
    var out: [(Int64, String)] = []
    while try s.step() { if let p = s.text(1) { out.append((s.int(0), p)) } }
    return out
  }

  func storePath(row: Int64) throws(ChunkStoreError) -> String? {
    let s = try prepare("SELECT store_path FROM paths WHERE id = ?").bind(row)
    return try s.step() ? s.text(0) : nil
  }

  func countPaths(state: Int64) throws(ChunkStoreError) -> Int {
    let s = try prepare("SELECT COUNT(*) FROM paths WHERE state = \(state)")
    return try s.step() ? Int(s.int(0)) : 0
  }

  func deletePath(_ path: String) throws(ChunkStoreError) {
    try prepare("DELETE FROM paths WHERE store_path = ?").bind(path).run()
  }

  func deletePath(row: Int64) throws(ChunkStoreError) {
    try prepare("DELETE FROM paths WHERE id = ?").bind(row).run()
  }

  /// Keeps the row (and its narinfo facts) but not its tree: the path is to be fetched again.
  func markIncomplete(row: Int64) throws(ChunkStoreError) {
    try prepare("UPDATE paths SET state = 2, tree = NULL, files = 0, file_bytes = 0 WHERE id = ?").bind(row).run()
  }

  func markPartialComplete(_ path: String) throws(ChunkStoreError) {
    try prepare("UPDATE paths SET state = 1 WHERE store_path = ? AND state = 3").bind(path).run()
  }

  func touchPath(_ path: String, at time: Int64) throws(ChunkStoreError) {
    try prepare("UPDATE paths SET last_access = max(last_access, ?) WHERE store_path = ?").bind(time, path).run()
  }

  /// The path's row: its narinfo facts and tree.
  func insertPath(_ manifest: Manifest, state: ChunkStore.PathState, files: Int) throws(ChunkStoreError) {
    let info = manifest.info
    let t = now()
    try prepare(
      """
      INSERT INTO paths(store_path, state, nar_hash, nar_size, refs, deriver, sigs, ca, tree, files, file_bytes,
        registered, last_access) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
      """
    ).bind(
      info.storePath.path, state.rawValue, info.narHash.nix32, info.narSize, info.referenceNames.joined(separator: " "),
      info.deriver,
      info.signatures.joined(separator: "\n"), info.ca, manifest.encodeTree(), files, manifest.fileBytes, t, t
    ).run()
  }
}

extension Statement {
  /// The narinfo facts of a `paths` row whose columns from `c` on are store_path, nar_hash,
  /// nar_size, refs, deriver, sigs, ca.
  func pathInfo(at c: Int32) -> PathInfo? {
    guard let p = text(c), let sp = try? StorePath(parsingFull: p), let h = text(c + 1),
      let hash = try? NixHash(parsing: h)
    else { return nil }
    let refs = (text(c + 3) ?? "").split(separator: " ").compactMap {
      try? StorePath(baseName: String($0), storeDir: sp.storeDir)
    }
    let sigs = (text(c + 5) ?? "").split(separator: "\n").map(String.init)
    return PathInfo(
      storePath: sp, narHash: hash, narSize: UInt64(int(c + 2)), references: refs, deriver: text(c + 4),
      signatures: sigs, ca: text(c + 6))
  }
}
