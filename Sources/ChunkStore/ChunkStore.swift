internal import CZstd
import Foundation
import Logging
import NixFormats
import Synchronization
import Threads

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
public final class ChunkStore: Sendable {
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

    /// Threads of the async front: async callers (the serve, the daemon's control requests,
    /// substitution) block at most this many in the store at once.
    public var frontThreads = 4
  }

  public let configuration: Configuration
  let logger = Logger(label: "nixfs.chunkstore")
  /// The threads of the store's async front (`async`).
  let storeExecutor: BlockingExecutor
  let indexPath: String
  let packDirectory: String
  /// The flock'ed `lock` file of the writer (-1 when read-only).
  private let lockFD: Int32

  /// The writer connection (nil when read-only): ingest commits, GC, fsck, pins.
  private let writer: Mutex<Database?>
  let isWriter: Bool
  /// Checkpoints the writer's WAL off the commit path.
  private let checkpointer: Checkpointer?
  /// Idle reader connections.
  private let readers = Mutex<[Database]>([])

  /// Shared by reads and ingest dedup checks, exclusive for GC deletion.
  let gcLock = ReadersWriterLock()

  /// The in-memory bookkeeping of packs, ingests, pins and totals, under one lock.
  struct Bookkeeping {
    var packFDs: [Int64: Int32] = [:]
    /// Packs with room that no ingest is appending to; an ingest leases one exclusively.
    var idlePacks: [Int64] = []
    var leasedPacks: Set<Int64> = []
    var ingesting: Set<StorePath> = []
    /// Existing chunks an in-flight ingest relies on: GC keeps their rows even at zero references.
    var borrowed: [ChunkID: Int] = [:]
    var memoryPins: [StorePath: Int] = [:]
    var touches: [StorePath: Int64] = [:]
    /// Running total of chunks' stored bytes (writer only); nil until first computed.
    var storedTotal: UInt64?
  }
  let bookkeeping = Mutex(Bookkeeping())
  /// Read on every tree lookup of the filesystem: an atomic, not the state lock.
  let evictionCount = Atomic<UInt64>(0)
  let chunkLocations = ChunkLocations()
  /// False only for a read-only open of an index no writer of this version has migrated yet.
  let hasSkipColumn: Bool

  let chunkCache: ChunkCache
  /// Fetched, verified chunks not yet written to a pack (see `accept`).
  let arriving = ArrivingChunks()
  let layouts = Mutex<[ContentID: ContentLayout]>([:])

  /// Opens (creating if needed) the store. Unless read-only, takes the writer lock and reclaims
  /// what a crashed writer left: pack bytes past the committed length, unreferenced chunks.
  public init(_ configuration: Configuration) throws(ChunkStoreError) {
    self.configuration = configuration
    storeExecutor = BlockingExecutor(name: "nixfs-store", threads: configuration.frontThreads)
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
      writer = Mutex(nil)
      isWriter = false
      checkpointer = nil
      lockFD = -1
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
    let db: Database
    let c: Checkpointer
    do {
      db = try Database(path: indexPath)
      try db.configureWriter()
      c = try Checkpointer(path: indexPath)
    } catch {
      close(fd)
      throw error
    }
    c.attach(to: db)
    hasSkipColumn = true
    writer = Mutex(db)
    isWriter = true
    checkpointer = c
    try migrate(db)
    try recover(db)
  }

  deinit {
    flushTouches()
    if let checkpointer {
      writer.withLock { db in if let db { checkpointer.detach(from: db) } }
      checkpointer.stop()
    }
    for fd in bookkeeping.withLock({ $0.packFDs.values }) { close(fd) }
    if lockFD >= 0 { close(lockFD) }
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
    if let d = readers.withLock({ $0.popLast() }) {
      db = d
    } else {
      db = try Database(path: indexPath, readOnly: configuration.readOnly)
      if !configuration.readOnly { try db.configureReader() }
    }
    defer {
      db.resetAll()
      readers.withLock { $0.append(db) }
    }
    return try body(db)
  }

  func withWriter<T>(_ body: (Database) throws -> T) throws -> T {
    try writer.withLock { writer in
      guard let writer else { throw ChunkStoreError.index(path: indexPath, operation: "write", message: "store opened read-only") }
      defer { writer.resetAll() }
      return try body(writer)
    }
  }

  /// The largest chunk this store makes: a FastCDC maximum, or a group of packed small files
  /// (which may be larger with a small maximum or a large small-file limit).
  var largestChunk: Int { max(configuration.chunking.maxSize, Ingest.groupBytes + configuration.smallFileLimit) }
}
