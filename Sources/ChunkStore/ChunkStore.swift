internal import CZstd
import Foundation
import Logging
import NixFormats
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// The node's deduplicated chunk store (see Documentation/chunk-store.md).
///
/// Layout of the state directory:
/// - `lock`: flock'ed by the one process allowed to write (ingest, GC, fsck).
/// - `index.sqlite` (WAL): packs, chunks, file contents and their chunk lists, store paths with
///   their trees and narinfo metadata, pins.
/// - `packs/NNNNNNNN.pack`: append-only files of chunks, each zstd-compressed on its own (or raw
///   when that does not pay), located by (pack, offset, stored size) in the index.
///
/// Small files: files of at most `smallFileLimit` (default 4 KiB) are packed together, in ingest
/// order, into shared chunks of about 16 KiB per store path; each keeps its own content row (so
/// identical files still share one content and one inode) that names its bytes as a slice
/// (`skip`, `size`) of the shared chunk. This keeps the index at three rows per small file instead
/// of five, and the bytes out of the index's WAL. Other files smaller than the FastCDC minimum are
/// one chunk each, named like their content. A chunk of at most `inlineLimit` (2 KiB: the tail of
/// a file, a last small-file group) is kept inside its index row instead of a pack.
///
/// Thread-safe: reads use a pool of SQLite connections (WAL readers never wait for the writer)
/// and `pread`; ingests run concurrently and serialise only for their index commit.
public final class ChunkStore: @unchecked Sendable {
  public struct Configuration: Sendable {
    public var stateDirectory: String
    public var chunking: FastCDC
    /// zstd level for each chunk. 1 by default: on two cores level 3 costs about a quarter of the
    /// ingest speed (zstd is most of the CPU) for 3.5 % fewer stored bytes.
    public var compressionLevel: Int32
    /// Chunks up to this raw size live in the index row rather than in a pack.
    public var inlineLimit: Int
    /// Files up to this size are packed together into shared chunks (0: never).
    public var smallFileLimit: Int
    /// Budget of the decompressed-chunk cache.
    public var cacheBytes: Int
    /// A pack stops taking new chunks past this size.
    public var packLimit: UInt64
    /// Threads that hash, compress and write chunks for each ingest.
    public var ingestThreads: Int
    /// When set, GC runs after each commit to keep stored bytes under it.
    public var maxStoredBytes: UInt64?
    /// Open without the writer lock: reads, dump and stats only (e.g. while the daemon runs).
    public var readOnly: Bool

    public init(
      stateDirectory: String = "/var/lib/nixfs", chunking: FastCDC = FastCDC(), compressionLevel: Int32 = 1,
      inlineLimit: Int = 2048, smallFileLimit: Int = 4096, cacheBytes: Int = 64 << 20, packLimit: UInt64 = 1 << 30,
      ingestThreads: Int = 2, maxStoredBytes: UInt64? = nil, readOnly: Bool = false
    ) {
      self.stateDirectory = stateDirectory
      self.chunking = chunking
      self.compressionLevel = compressionLevel
      self.inlineLimit = inlineLimit
      self.smallFileLimit = smallFileLimit
      self.cacheBytes = cacheBytes
      self.packLimit = packLimit
      self.ingestThreads = ingestThreads
      self.maxStoredBytes = maxStoredBytes
      self.readOnly = readOnly
    }
  }

  public let configuration: Configuration
  let logger = Logger(label: "nixfs.chunkstore")
  let indexPath: String
  let packDirectory: String
  private var lockFD: Int32 = -1

  /// The writer connection: ingest commits, GC, fsck, pins. Guarded by `writerLock`.
  let writer: Database?
  let writerLock = NSLock()
  /// Checkpoints the writer's WAL off the commit path.
  private let checkpointer: Checkpointer?
  /// Idle reader connections.
  private var readers: [Database] = []
  private let readersLock = NSLock()

  /// Shared by reads and ingest dedup checks, exclusive for GC deletion.
  let gcLock = RWLock()

  let stateLock = NSLock()
  private var packFDs: [Int64: Int32] = [:]
  /// Packs with room that no ingest is appending to; an ingest leases one exclusively.
  private var idlePacks: [Int64] = []
  var leasedPacks: Set<Int64> = []
  private var ingesting: Set<String> = []
  /// Existing chunks an in-flight ingest relies on: GC keeps their rows even at zero references.
  private var borrowed: [ChunkID: Int] = [:]
  private var memoryPins: [String: Int] = [:]
  private var touches: [String: Int64] = [:]
  /// Running total of chunks' stored bytes (writer only); nil until first computed.
  var storedTotal: UInt64?
  /// Read on every tree lookup of the filesystem: an atomic, not the state lock.
  let evictionCount = Atomic<UInt64>(0)
  let chunkLocations = ChunkLocations()
  /// False only for a read-only open of an index no writer of this version has migrated yet.
  let hasSkipColumn: Bool

  let chunkCache: ChunkCache
  /// Fetched, verified chunks not yet written to a pack (see `accept`).
  let arriving = ArrivingChunks()
  private let layoutCache = NSLock()
  private var layouts: [ContentID: ContentLayout] = [:]

  /// Opens (creating if needed) the store. Unless read-only, takes the writer lock and reclaims
  /// what a crashed writer left: pack bytes past the committed length, unreferenced chunks.
  public init(_ configuration: Configuration) throws(ChunkStoreError) {
    self.configuration = configuration
    let dir = configuration.stateDirectory
    indexPath = dir + "/index.sqlite"
    packDirectory = dir + "/packs"
    chunkCache = ChunkCache(budget: configuration.cacheBytes)
    if configuration.readOnly {
      guard FileManager.default.fileExists(atPath: indexPath) else {
        throw .io(path: indexPath, operation: "open", errno: ENOENT)
      }
      let facts = try Self.schemaFacts(try Database(path: indexPath, readOnly: true), indexPath)
      hasSkipColumn = facts.hasSkip
      writer = nil
      checkpointer = nil
      return
    }
    try preparePrivateDirectory(dir)
    try preparePrivateDirectory(packDirectory, stateMarkers: [])
    for file in [indexPath, indexPath + "-wal", indexPath + "-shm"]
    where file == indexPath || FileManager.default.fileExists(atPath: file) {
      try makePrivateFile(file)
    }
    let fd = open(dir + "/lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw .io(path: dir + "/lock", operation: "open", errno: errno) }
    _ = fchmod(fd, 0o600)
    if flock(fd, LOCK_EX | LOCK_NB) != 0 {
      close(fd)
      throw .locked(stateDir: dir)
    }
    lockFD = fd
    let db = try Database(path: indexPath)
    hasSkipColumn = true
    writer = db
    try db.exec("PRAGMA journal_mode=WAL")
    // FULL: a commit is durable when COMMIT returns, which is what makes a path visible.
    try db.exec("PRAGMA synchronous=FULL")
    // A larger page cache keeps the chunk and content B-trees' upper levels in memory.
    try db.exec("PRAGMA cache_size=-65536")
    try db.exec(Self.schema)
    let c = try Checkpointer(path: indexPath)
    c.attach(to: db)
    checkpointer = c
    try migrate(db)
    try recover()
  }

  deinit {
    flushTouches()
    if let writer, let checkpointer {
      checkpointer.detach(from: writer)
      checkpointer.stop()
    }
    for fd in packFDs.values { close(fd) }
    if lockFD >= 0 { close(lockFD) }
  }

  static let schema = """
    CREATE TABLE IF NOT EXISTS packs(id INTEGER PRIMARY KEY, committed INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS chunks(
      id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, size INTEGER NOT NULL, stored INTEGER NOT NULL,
      codec INTEGER NOT NULL, pack INTEGER, offset INTEGER, data BLOB, refs INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack, offset) WHERE pack IS NOT NULL;
    CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks(id) WHERE refs = 0;
    CREATE INDEX IF NOT EXISTS chunks_absent ON chunks(id) WHERE codec = 2;
    CREATE TABLE IF NOT EXISTS contents(
      id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, size INTEGER NOT NULL, refs INTEGER NOT NULL,
      skip INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE IF NOT EXISTS content_chunks(
      content INTEGER NOT NULL, offset INTEGER NOT NULL, chunk INTEGER NOT NULL,
      PRIMARY KEY(content, offset)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS paths(
      id INTEGER PRIMARY KEY, store_path TEXT NOT NULL UNIQUE, state INTEGER NOT NULL,
      nar_hash TEXT NOT NULL, nar_size INTEGER NOT NULL, refs TEXT NOT NULL, deriver TEXT, sigs TEXT NOT NULL,
      ca TEXT, tree BLOB, files INTEGER NOT NULL, file_bytes INTEGER NOT NULL,
      registered INTEGER NOT NULL, last_access INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS paths_lru ON paths(state, last_access);
    CREATE TABLE IF NOT EXISTS unverified_slices(chunk BLOB NOT NULL, content BLOB NOT NULL, skip INTEGER NOT NULL,
      size INTEGER NOT NULL, PRIMARY KEY(chunk, content)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS pins(store_path TEXT NOT NULL, holder TEXT NOT NULL,
      PRIMARY KEY(store_path, holder)) WITHOUT ROWID;
    """

  /// Schema versions (SQLite `user_version`): 0 before packed small files; 1 migrated from 0
  /// (`contents.skip` added; multi-chunk contents stored before keep SHA-256 names); 2 every
  /// multi-chunk content is named by its chunk list (`ofChunkList`), so fsck can check those names.
  static let listNamedVersion: Int64 = 2

  /// The index's schema version and whether `contents.skip` exists; refuses a newer schema.
  static func schemaFacts(_ db: Database, _ path: String) throws(ChunkStoreError) -> (version: Int64, hasSkip: Bool) {
    let version = try db.prepare("PRAGMA user_version")
    let current = try version.step() ? version.int(0) : 0
    version.again()
    if current > listNamedVersion {
      throw .index(
        path: path, operation: "open",
        message: "schema version \(current) is newer than this nixfs understands (\(listNamedVersion)): use the newer nixfs")
    }
    let columns = try db.prepare("SELECT 1 FROM pragma_table_info('contents') WHERE name = 'skip'")
    let hasSkip = try columns.step()
    columns.again()
    return (current, hasSkip)
  }

  /// Brings an index made by an earlier version up to this schema. (A nixfs from before packed
  /// small files must not open the result: it would ignore `skip` and read the wrong bytes.)
  func migrate(_ db: Database) throws(ChunkStoreError) {
    let facts = try Self.schemaFacts(db, indexPath)
    var current = facts.version
    if !facts.hasSkip {
      try db.exec("ALTER TABLE contents ADD COLUMN skip INTEGER NOT NULL DEFAULT 0")
      current = max(current, 1)
      try db.exec("PRAGMA user_version = \(current)")
    }
    // A store that holds no content yet (new, or emptied by GC) can promise list names from now on.
    if current < Self.listNamedVersion {
      let any = try db.prepare("SELECT 1 FROM contents LIMIT 1")
      let hasContents = try any.step()
      any.again()
      if !hasContents { try db.exec("PRAGMA user_version = \(Self.listNamedVersion)") }
    }
  }

  enum PathState: Int64 {
    case complete = 1
    /// Known but its data is gone (fsck removed a bad chunk): fetch it again.
    case incomplete = 2
    /// Materialised from a verified chunk index: tree and chunk lists here, chunks fetched as
    /// they are read (codec `absent` until then). Served like a complete path; never dumped.
    case partial = 3
  }

  // MARK: Connections

  func withReader<T>(_ body: (Database) throws -> T) throws -> T {
    let db: Database
    if let d = readersLock.locked({ readers.popLast() }) {
      db = d
    } else {
      db = try Database(path: indexPath, readOnly: configuration.readOnly)
      if !configuration.readOnly { try db.exec("PRAGMA query_only=1") }
    }
    defer {
      db.resetAll()
      readersLock.locked { readers.append(db) }
    }
    return try body(db)
  }

  func withWriter<T>(_ body: (Database) throws -> T) throws -> T {
    guard let writer else { throw ChunkStoreError.index(path: indexPath, operation: "write", message: "store opened read-only") }
    return try writerLock.locked {
      defer { writer.resetAll() }
      return try body(writer)
    }
  }

  func packPath(_ id: Int64) -> String {
    packDirectory + "/" + String(repeating: "0", count: max(0, 8 - String(id).count)) + String(id) + ".pack"
  }

  /// A cached descriptor of a pack, opened for reading and (unless read-only) writing.
  func packFD(_ id: Int64) throws(ChunkStoreError) -> Int32 {
    stateLock.lock()
    defer { stateLock.unlock() }
    if let fd = packFDs[id] { return fd }
    let path = packPath(id)
    let fd = open(path, (configuration.readOnly ? O_RDONLY : O_RDWR | O_CREAT) | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw .io(path: path, operation: "open", errno: errno) }
    packFDs[id] = fd
    return fd
  }

  func closePack(_ id: Int64) {
    stateLock.locked {
      if let fd = packFDs.removeValue(forKey: id) { close(fd) }
    }
  }

  // MARK: Recovery

  /// Undo a crashed writer: cut packs back to their committed length, delete pack files the
  /// index does not know, and drop chunks no content references.
  func recover() throws(ChunkStoreError) {
    guard let db = writer else { return }
    var known: Set<String> = []
    let s = try db.prepare("SELECT id, committed FROM packs")
    var packs: [(Int64, Int64)] = []
    while try s.step() { packs.append((s.int(0), s.int(1))) }
    for (id, committed) in packs {
      let path = packPath(id)
      known.insert((path as NSString).lastPathComponent)
      var st = stat()
      if stat(path, &st) == 0 && Int64(st.st_size) > committed {
        logger.info("reclaiming \(Int64(st.st_size) - committed) uncommitted bytes of \(path)")
        if truncate(path, off_t(committed)) != 0 { throw .io(path: path, operation: "truncate", errno: errno) }
      }
      if committed < Int64(configuration.packLimit) { idlePacks.append(id) }
    }
    for name in (try? FileManager.default.contentsOfDirectory(atPath: packDirectory)) ?? [] where !known.contains(name) {
      logger.info("removing unknown pack file \(name)")
      unlink(packDirectory + "/" + name)
    }
    try sweepOrphanChunks(db)
  }

  /// Deletes chunk rows with no references (left when an ingest that borrowed them died) unless
  /// an ingest in flight borrows them. Caller holds the writer (or is `init`).
  func sweepOrphanChunks(_ db: Database) throws(ChunkStoreError) {
    let s = try db.prepare("SELECT id, digest, pack, offset, stored FROM chunks WHERE refs = 0")
    var dead: [(Int64, Int64?, UInt64, UInt64)] = []
    let keep = stateLock.locked { borrowed }
    while try s.step() {
      guard let d = s.digest(1), keep[d] == nil else { continue }
      dead.append((s.int(0), s.isNull(2) ? nil : s.int(2), UInt64(s.int(3)), UInt64(s.int(4))))
    }
    // Packed files of partial paths gone since, whose chunk never came.
    try db.exec("DELETE FROM unverified_slices WHERE chunk NOT IN (SELECT digest FROM chunks)")
    guard !dead.isEmpty else { return }
    let del = "DELETE FROM chunks WHERE id = ?"
    do {
      try db.transaction {
        for d in dead { try db.prepare(del).bind(d.0).run() }
      }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "sweep", message: "\(error)") }
    adjustStored(removing: dead.reduce(0) { $0 + $1.3 })
    for case (_, let pack?, let off, let len) in dead { punchHole(try packFD(pack), offset: off, length: len) }
  }

  // MARK: Pack leases (used by Ingest)

  struct PackLease {
    let id: Int64
    let fd: Int32
    let start: UInt64
  }

  func leasePack() throws(ChunkStoreError) -> PackLease {
    let id: Int64
    if let idle = stateLock.locked({ idlePacks.popLast() }) {
      id = idle
    } else {
      do {
        id = try withWriter { db in
          try db.prepare("INSERT INTO packs(committed) VALUES(0)").run()
          return db.lastInsertRowID
        }
      } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "new pack", message: "\(error)") }
      _ = try packFD(id)
      // The pack's directory entry must be durable before any chunk in it is committed.
      fsyncDirectory(packDirectory)
    }
    stateLock.locked { _ = leasedPacks.insert(id) }
    let fd = try packFD(id)
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw .io(path: packPath(id), operation: "stat", errno: errno) }
    return PackLease(id: id, fd: fd, start: UInt64(st.st_size))
  }

  func returnPack(_ lease: PackLease, end: UInt64) {
    stateLock.locked {
      leasedPacks.remove(lease.id)
      if end < configuration.packLimit { idlePacks.append(lease.id) }
    }
  }

  /// Forgets a pack GC emptied, unless an ingest is appending to it. Returns true if forgotten.
  func retirePack(_ id: Int64) -> Bool {
    let ok = stateLock.locked { () -> Bool in
      if leasedPacks.contains(id) { return false }
      idlePacks.removeAll { $0 == id }
      return true
    }
    if ok { closePack(id) }
    return ok
  }

  func beginIngesting(_ path: String) throws(ChunkStoreError) {
    try stateLock.locked { () throws(ChunkStoreError) in
      if ingesting.contains(path) { throw .ingestInProgress(storePath: path) }
      ingesting.insert(path)
    }
  }
  func endIngesting(_ path: String) { _ = stateLock.locked { ingesting.remove(path) } }

  func borrow(_ id: ChunkID) { stateLock.locked { borrowed[id, default: 0] += 1 } }
  func giveBack(_ ids: some Sequence<ChunkID>) {
    stateLock.locked {
      for id in ids {
        let n = (borrowed[id] ?? 1) - 1
        borrowed[id] = n == 0 ? nil : n
      }
    }
  }
  func isBorrowed(_ id: ChunkID) -> Bool { stateLock.locked { borrowed[id] != nil } }

  // MARK: Ingest

  /// Starts ingesting `info.storePath` from its uncompressed NAR. Feed the bytes, then commit.
  public func ingest(_ info: PathInfo) throws(ChunkStoreError) -> Ingest {
    guard writer != nil else { throw .index(path: indexPath, operation: "ingest", message: "store opened read-only") }
    if isComplete(info.storePath) { throw .alreadyComplete(storePath: info.storePath) }
    // A whole NAR replaces a partial path: its references go first (readers excluded), so the
    // commit starts from a row with none.
    if let row = try partialRow(info.storePath) { _ = try evict(row: row, path: info.storePath, keepAsIncomplete: true) }
    try beginIngesting(info.storePath)
    do {
      return try Ingest(store: self, info: info)
    } catch {
      endIngesting(info.storePath)
      throw error
    }
  }

  public func ingest(_ narInfo: NarInfo) throws(ChunkStoreError) -> Ingest { try ingest(PathInfo(narInfo)) }

  /// Called by `Ingest.commit` after a successful commit.
  func didCommit(_ path: String) {
    if let budget = configuration.maxStoredBytes {
      // The path just fetched is about to be read: never its own victim, even over budget.
      pin(path)
      defer { unpin(path) }
      do { _ = try collectGarbage(maxStoredBytes: budget) } catch { logger.error("online GC failed: \(error)") }
    }
  }

  /// How many paths GC has evicted since this store was opened: callers that cache trees check it
  /// to notice that a path they hold may be gone.
  public var evictions: UInt64 { evictionCount.load(ordering: .acquiring) }

  // MARK: Queries for the filesystem

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

  // MARK: Pins and LRU

  /// Pins a path for as long as this process runs (e.g. while files of it are open). Counted.
  public func pin(_ path: StorePath) { pin(path.path) }
  public func unpin(_ path: StorePath) { unpin(path.path) }
  func pin(_ path: String) { stateLock.locked { memoryPins[path, default: 0] += 1 } }
  func unpin(_ path: String) {
    stateLock.locked {
      let n = (memoryPins[path] ?? 1) - 1
      memoryPins[path] = n <= 0 ? nil : n
    }
  }

  /// Pins a path durably on behalf of `holder` (e.g. a published volume ID) until `unpin`.
  public func pin(_ path: StorePath, holder: String) throws {
    try withWriter { db in try db.prepare("INSERT OR IGNORE INTO pins VALUES(?, ?)").bind(path.path, holder).run() }
  }
  /// Pins a whole closure for `holder` in one transaction (one fsync, not one per path).
  public func pin(_ paths: [StorePath], holder: String) throws {
    try withWriter { db in
      try db.transaction {
        for p in paths { try db.prepare("INSERT OR IGNORE INTO pins VALUES(?, ?)").bind(p.path, holder).run() }
      }
    }
  }
  public func unpin(_ path: StorePath, holder: String) throws {
    try withWriter { db in try db.prepare("DELETE FROM pins WHERE store_path = ? AND holder = ?").bind(path.path, holder).run() }
  }
  public func unpinAll(holder: String) throws {
    try withWriter { db in try db.prepare("DELETE FROM pins WHERE holder = ?").bind(holder).run() }
  }

  /// Marks a path used now, for LRU eviction. Cheap: kept in memory and written at GC or close.
  public func touch(_ path: StorePath) { stateLock.locked { touches[path.path] = now() } }

  func flushTouches() {
    guard let writer else { return }
    let pending = stateLock.locked { () -> [String: Int64] in
      defer { touches = [:] }
      return touches
    }
    guard !pending.isEmpty else { return }
    writerLock.locked {
      _ = try? writer.transaction {
        for (p, t) in pending {
          try writer.prepare("UPDATE paths SET last_access = max(last_access, ?) WHERE store_path = ?").bind(t, p).run()
        }
      }
    }
  }

  // MARK: Reads

  struct ChunkLocation: Sendable {
    let rowID: Int64
    let id: ChunkID
    let size: Int
    let stored: Int
    let codec: Codec
    let pack: Int64?
    let offset: UInt64
  }

  struct ContentLayout: Sendable {
    let size: UInt64
    /// The content is bytes [skip, skip + size) of its chunks laid end to end: skip is non-zero
    /// only for a small file packed into a shared chunk.
    let skip: UInt64
    /// Start offset of each chunk in that concatenation, ascending.
    let starts: [UInt64]
    let chunks: [ChunkLocation]

    /// As a manifest lists it.
    var refs: [ChunkRef] { chunks.map { ChunkRef(id: $0.id, size: UInt32($0.size)) } }
    var slice: UInt32? { Manifest.slice(skip: skip, size: size, of: chunks.reduce(0) { $0 + UInt64($1.size) }) }
  }

  func layout(_ content: ContentID) throws(ChunkStoreError) -> ContentLayout {
    if let l = layoutCache.locked({ layouts[content] }) { return l }
    let l: ContentLayout
    do {
      l = try withReader { db -> ContentLayout in
        let c = try db.prepare(
          hasSkipColumn
            ? "SELECT id, size, skip FROM contents WHERE digest = ?" : "SELECT id, size, 0 FROM contents WHERE digest = ?"
        ).bind(content)
        guard try c.step() else { throw ChunkStoreError.contentNotFound(content) }
        let contentRow = c.int(0)
        let size = UInt64(c.int(1))
        let skip = UInt64(c.int(2))
        let s = try db.prepare(
          """
          SELECT cc.offset, ch.id, ch.digest, ch.size, ch.stored, ch.codec, ch.pack, ch.offset
          FROM content_chunks cc LEFT JOIN chunks ch ON ch.id = cc.chunk WHERE cc.content = ? ORDER BY cc.offset
          """
        ).bind(contentRow)
        var starts: [UInt64] = []
        var chunks: [ChunkLocation] = []
        while try s.step() {
          guard let d = s.digest(2) else { throw ChunkStoreError.chunkMissing(chunk: content, content: content) }
          starts.append(UInt64(s.int(0)))
          chunks.append(
            ChunkLocation(
              rowID: s.int(1), id: d, size: Int(s.int(3)), stored: Int(s.int(4)), codec: Codec(rawValue: s.int(5)) ?? .raw,
              pack: s.isNull(6) ? nil : s.int(6), offset: UInt64(s.int(7))))
        }
        return ContentLayout(size: size, skip: skip, starts: starts, chunks: chunks)
      }
    } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "layout", message: "\(error)") }
    layoutCache.locked {
      // Crude bound: layouts are small, and dropping them all costs only re-reading the index.
      if layouts.count >= 65536 { layouts.removeAll(keepingCapacity: true) }
      layouts[content] = l
    }
    return l
  }

  /// The uncompressed bytes of one chunk, from the cache or from disk. Not re-hashed on the hot
  /// path (fsck verifies every chunk).
  func chunkBytes(_ loc: ChunkLocation) throws(ChunkStoreError) -> [UInt8] {
    if let b = chunkCache.get(loc.id) { return b }
    if loc.codec == .absent {
      if let b = arriving.bytes(loc.id) { return b }
      // Fetched since this layout was cached?
      guard let now = try presentLocation(loc) else { throw .chunkAbsent(chunk: loc.id, size: loc.size) }
      return try chunkBytes(now)
    }
    let stored: [UInt8]
    if let pack = loc.pack {
      let fd = try packFD(pack)
      guard let b = preadFully(fd, count: loc.stored, offset: loc.offset), b.count == loc.stored else {
        throw .chunkCorrupt(chunk: loc.id, pack: pack, offset: loc.offset, reason: "short read")
      }
      // The reader's page cache (FUSE, keep_cache) and the chunk cache hold these bytes now; the
      // compressed pack pages would be a second copy in the page cache. Readahead beyond stays.
      _ = posix_fadvise(fd, off_t(loc.offset), off_t(loc.stored), POSIX_FADV_DONTNEED)
      stored = b
    } else {
      do {
        stored = try withReader { db -> [UInt8] in
          let s = try db.prepare("SELECT data FROM chunks WHERE id = ?").bind(loc.rowID)
          guard try s.step(), let b = s.blob(0) else {
            throw ChunkStoreError.chunkCorrupt(chunk: loc.id, pack: 0, offset: 0, reason: "inline data missing")
          }
          return b
        }
      } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "chunk", message: "\(error)") }
    }
    let raw: [UInt8]
    switch loc.codec {
    case .raw: raw = stored
    case .zstd:
      guard let r = decompress(stored, rawSize: loc.size) else {
        throw .chunkCorrupt(chunk: loc.id, pack: loc.pack ?? 0, offset: loc.offset, reason: "zstd decompression failed")
      }
      raw = r
    case .absent: throw .chunkAbsent(chunk: loc.id, size: loc.size)
    }
    guard raw.count == loc.size else {
      throw .chunkCorrupt(chunk: loc.id, pack: loc.pack ?? 0, offset: loc.offset, reason: "wrong size")
    }
    chunkCache.put(loc.id, raw)
    return raw
  }

  /// Reads up to `buffer.count` bytes of a file content at `offset` into `buffer`; returns the
  /// count (short only at the end of the content).
  public func read(content: ContentID, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ChunkStoreError) -> Int {
    try gcLock.read { () throws(ChunkStoreError) -> Int in
      let layout = try self.layout(content)
      if offset > layout.size { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
      let want = Int(min(UInt64(buffer.count), layout.size - offset))
      guard want > 0 else { return 0 }
      let at = offset + layout.skip
      // Last chunk starting at or before the offset.
      var lo = 0
      var hi = layout.starts.count
      while hi - lo > 1 {
        let mid = (lo + hi) / 2
        if layout.starts[mid] <= at { lo = mid } else { hi = mid }
      }
      var done = 0
      var i = lo
      while done < want {
        guard i < layout.chunks.count else { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
        let bytes = try chunkBytes(layout.chunks[i])
        let pos = Int(at + UInt64(done) - layout.starts[i])
        guard pos < bytes.count else { throw .readPastEnd(content: content, offset: offset, size: layout.size) }
        let n = min(bytes.count - pos, want - done)
        bytes.withUnsafeBytes { src in
          (buffer.baseAddress! + done).copyMemory(from: src.baseAddress! + pos, byteCount: n)
        }
        done += n
        i += 1
      }
      return done
    }
  }

  public func read(content: ContentID, offset: UInt64, count: Int) throws(ChunkStoreError) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var n = 0
    do { n = try out.withUnsafeMutableBytes { try read(content: content, offset: offset, into: $0) } } catch let e as ChunkStoreError {
      throw e
    } catch { preconditionFailure("read throws only ChunkStoreError") }
    out.removeLast(count - n)
    return out
  }

  /// Streams a file content's bytes, chunk by chunk.
  /// Holds off GC for the duration, so no chunk of the layout is freed under it.
  public func forEachPiece(of content: ContentID, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
    try gcLock.read { () throws in
      let layout = try self.layout(content)
      let end = layout.skip + layout.size
      for (loc, start) in zip(layout.chunks, layout.starts) where start < end {
        let bytes = try chunkBytes(loc)
        // Only this content's part of a shared chunk.
        let from = Int(max(layout.skip, start) - start)
        let to = Int(min(end - start, UInt64(bytes.count)))
        guard from <= to else { continue }
        try bytes.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[from..<to])) }
      }
    }
  }

  // MARK: Export

  /// Writes the NAR of a complete path (byte-identical to what was ingested) to `sink`, checking
  /// on the way that it still hashes to the recorded NarHash.
  public func dump(_ path: StorePath, to sink: ([UInt8]) throws -> Void) throws {
    guard let m = try tree(of: path) else { throw ChunkStoreError.notComplete(storePath: path.path) }
    pin(path)
    defer { unpin(path) }
    var writer = NARWriter()
    var hasher = NixHasher()
    func drain() throws {
      let out = writer.take()
      out.withUnsafeBytes { hasher.update($0) }
      try sink(out)
    }
    try m.replay(
      { event in
        try writer.write(event)
        if writer.output.count >= 1 << 20 { try drain() }
      },
      content: { content, _, emit in try forEachPiece(of: content, emit) })
    try drain()
    let got = hasher.finalize().nix32
    if got != m.info.narHash || hasher.byteCount != m.info.narSize {
      throw ChunkStoreError.narHashMismatch(storePath: path.path, expected: m.info.narHash, actual: got)
    }
  }

  // MARK: Pinned set (for GC)

  func pinnedPaths(_ db: Database) throws -> Set<String> {
    var out = Set(stateLock.locked { Array(memoryPins.keys) + Array(ingesting) })
    let s = try db.prepare("SELECT DISTINCT store_path FROM pins")
    while try s.step() { if let t = s.text(0) { out.insert(t) } }
    return out
  }

  /// The largest chunk this store makes: a FastCDC maximum, or a group of packed small files
  /// (which may be larger with a small maximum or a large small-file limit).
  var largestChunk: Int { max(configuration.chunking.maxSize, Ingest.groupBytes + configuration.smallFileLimit) }

  /// Paths GC must keep now (durable pins, open files, ingests), for the daemon's gauges.
  public func pinnedPathCount() -> Int { (try? withReader { db in try pinnedPaths(db).count }) ?? 0 }

  /// Partial paths, counted (for the daemon's gauges).
  public func partialPathCount() -> Int {
    (try? withReader { db in
      let s = try db.prepare("SELECT COUNT(*) FROM paths WHERE state = 3")
      return try s.step() ? Int(s.int(0)) : 0
    }) ?? 0
  }

  func dropLayouts() { layoutCache.locked { layouts.removeAll() } }

  func invalidate(contents: [ContentID]) {
    layoutCache.locked { for c in contents { layouts[c] = nil } }
  }
}

/// A bounded cache of decompressed chunks, least recently used out first.
final class ChunkCache: @unchecked Sendable {
  private let lock = NSLock()
  private var entries: [ChunkID: (bytes: [UInt8], tick: UInt64)] = [:]
  private var size = 0
  private var tick: UInt64 = 0
  let budget: Int

  init(budget: Int) { self.budget = budget }

  func get(_ id: ChunkID) -> [UInt8]? {
    lock.locked {
      guard let e = entries[id] else { return nil }
      tick += 1
      entries[id] = (e.bytes, tick)
      return e.bytes
    }
  }

  func put(_ id: ChunkID, _ bytes: [UInt8]) {
    guard bytes.count <= budget else { return }
    lock.locked {
      tick += 1
      if entries.updateValue((bytes, tick), forKey: id) == nil { size += bytes.count }
      if size > budget {
        // Evict the oldest quarter at once so eviction cost amortises over many puts.
        let sorted = entries.sorted { $0.value.tick < $1.value.tick }
        for (k, v) in sorted.prefix(max(1, sorted.count / 4)) {
          entries[k] = nil
          size -= v.bytes.count
        }
      }
    }
  }

  var bytes: Int { lock.locked { size } }
}
