import Foundation

extension ChunkStore {
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
}

extension Database {
  /// The writer connection's settings, and the schema (created if missing).
  func configureWriter() throws(ChunkStoreError) {
    try exec("PRAGMA journal_mode=WAL")
    // FULL: a commit is durable when COMMIT returns, which is what makes a path visible.
    try exec("PRAGMA synchronous=FULL")
    // A larger page cache keeps the chunk and content B-trees' upper levels in memory.
    try exec("PRAGMA cache_size=-65536")
    try exec(ChunkStore.schema)
  }

  /// A pooled reader of a writable store: it must never write.
  func configureReader() throws(ChunkStoreError) {
    try exec("PRAGMA query_only=1")
  }
}
