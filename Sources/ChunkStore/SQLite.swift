internal import CSQLite
import Foundation

/// A thin SQLite connection: prepared statements cached per SQL text. One connection is used by
/// one thread at a time (the store hands them out from a pool), so it is opened NOMUTEX.
final class Database: @unchecked Sendable {
  let handle: OpaquePointer
  let path: String
  private var statements: [String: Statement] = [:]

  init(path: String, readOnly: Bool = false) throws(ChunkStoreError) {
    var db: OpaquePointer?
    let flags = (readOnly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) | SQLITE_OPEN_NOMUTEX
    let rc = sqlite3_open_v2(path, &db, flags, nil)
    guard rc == SQLITE_OK, let db else {
      let msg = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
      if let db { sqlite3_close_v2(db) }
      throw .index(path: path, operation: "open", message: msg)
    }
    handle = db
    self.path = path
    sqlite3_busy_timeout(db, 30_000)
    sqlite3_extended_result_codes(db, 1)
  }

  deinit {
    for s in statements.values { sqlite3_finalize(s.handle) }
    sqlite3_close_v2(handle)
  }

  func error(_ operation: String) -> ChunkStoreError {
    .index(path: path, operation: operation, message: String(cString: sqlite3_errmsg(handle)))
  }

  func exec(_ sql: String) throws(ChunkStoreError) {
    var err: UnsafeMutablePointer<CChar>?
    if sqlite3_exec(handle, sql, nil, nil, &err) != SQLITE_OK {
      let msg = err.map { String(cString: $0) } ?? "unknown"
      sqlite3_free(err)
      throw .index(path: path, operation: String(sql.prefix(60)), message: msg)
    }
  }

  /// A cached prepared statement, reset and with bindings cleared.
  func prepare(_ sql: String) throws(ChunkStoreError) -> Statement {
    if let s = statements[sql] {
      sqlite3_reset(s.handle)
      sqlite3_clear_bindings(s.handle)
      return s
    }
    var stmt: OpaquePointer?
    guard sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &stmt, nil) == SQLITE_OK, let stmt else {
      throw error("prepare \(sql.prefix(60))")
    }
    let s = Statement(handle: stmt, db: self)
    statements[sql] = s
    return s
  }

  /// Runs `body` in a write transaction (BEGIN IMMEDIATE so the lock is taken up front).
  func transaction<T>(_ body: () throws -> T) throws -> T {
    try exec("BEGIN IMMEDIATE")
    do {
      let result = try body()
      try exec("COMMIT")
      return result
    } catch {
      try? exec("ROLLBACK")
      throw error
    }
  }

  /// Resets every cached statement: a statement left mid-result keeps its read snapshot open,
  /// which would pin the WAL and hide later commits from this connection.
  func resetAll() {
    for s in statements.values { sqlite3_reset(s.handle) }
  }

  var changes: Int { Int(sqlite3_changes(handle)) }
  var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }
}

final class Statement {
  let handle: OpaquePointer
  unowned let db: Database
  init(handle: OpaquePointer, db: Database) {
    self.handle = handle
    self.db = db
  }

  @discardableResult
  func bind(_ values: (any SQLValue)?...) -> Statement {
    for (i, v) in values.enumerated() {
      let idx = Int32(i + 1)
      switch v {
      case nil: sqlite3_bind_null(handle, idx)
      case let x as Int64: sqlite3_bind_int64(handle, idx, x)
      case let x as Int: sqlite3_bind_int64(handle, idx, Int64(x))
      case let x as UInt64: sqlite3_bind_int64(handle, idx, Int64(bitPattern: x))
      case let x as String: sqlite3_bind_text(handle, idx, x, -1, nixfs_sqlite_transient())
      case let x as [UInt8]:
        x.withUnsafeBytes { b in
          _ = sqlite3_bind_blob(handle, idx, b.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32(b.count), nixfs_sqlite_transient())
        }
      case let x as SHA256Digest: set(idx, x)
      case let x as any DigestName: set(idx, x.digest)
      default: preconditionFailure("unsupported SQL value \(String(describing: v))")
      }
    }
    return self
  }

  // Typed binds for hot loops: the variadic `bind` boxes every value in an existential and casts
  // it back, which costs more than SQLite's own work for a small row.
  /// Resets for another execution, keeping the bindings.
  @discardableResult
  func again() -> Statement {
    sqlite3_reset(handle)
    return self
  }
  func set(_ idx: Int32, _ v: Int64) { sqlite3_bind_int64(handle, idx, v) }
  func set(_ idx: Int32, _ v: Int) { sqlite3_bind_int64(handle, idx, Int64(v)) }
  func set(_ idx: Int32, _ v: UInt64) { sqlite3_bind_int64(handle, idx, Int64(bitPattern: v)) }
  func setNull(_ idx: Int32) { sqlite3_bind_null(handle, idx) }
  func set(_ idx: Int32, _ name: some DigestName) { set(idx, name.digest) }
  func set(_ idx: Int32, _ d: SHA256Digest) {
    // Big-endian words laid out in order are the digest's bytes; no array needed.
    withUnsafeBytes(of: (d.w0.bigEndian, d.w1.bigEndian, d.w2.bigEndian, d.w3.bigEndian)) { b in
      _ = sqlite3_bind_blob(handle, idx, b.baseAddress, 32, nixfs_sqlite_transient())
    }
  }
  func set(_ idx: Int32, blob x: [UInt8]) {
    x.withUnsafeBytes { b in
      // A non-null pointer even when empty: a null one would bind NULL, not an empty blob.
      let p = b.baseAddress ?? UnsafeRawPointer(bitPattern: 1)
      _ = sqlite3_bind_blob(handle, idx, p, Int32(b.count), nixfs_sqlite_transient())
    }
  }

  /// Steps once: true when a row is available.
  func step() throws(ChunkStoreError) -> Bool {
    let rc = sqlite3_step(handle)
    if rc == SQLITE_ROW { return true }
    if rc == SQLITE_DONE { return false }
    throw db.error("step \(String(cString: sqlite3_sql(handle)).prefix(60))")
  }

  func run() throws(ChunkStoreError) {
    while try step() {}
  }

  func int(_ col: Int32) -> Int64 { sqlite3_column_int64(handle, col) }
  func isNull(_ col: Int32) -> Bool { sqlite3_column_type(handle, col) == SQLITE_NULL }
  func text(_ col: Int32) -> String? {
    guard let p = sqlite3_column_text(handle, col) else { return nil }
    return String(cString: p)
  }
  func blob(_ col: Int32) -> [UInt8]? {
    if isNull(col) { return nil }
    let n = Int(sqlite3_column_bytes(handle, col))
    guard n > 0, let p = sqlite3_column_blob(handle, col) else { return [] }
    return Array(UnsafeRawBufferPointer(start: p, count: n))
  }
  func digest(_ col: Int32) -> SHA256Digest? {
    guard sqlite3_column_bytes(handle, col) == 32, let p = sqlite3_column_blob(handle, col) else { return nil }
    return SHA256Digest(bytes: UnsafeRawBufferPointer(start: p, count: 32))
  }
  func chunkID(_ col: Int32) -> ChunkID? { digest(col).map(ChunkID.init) }
  func contentID(_ col: Int32) -> ContentID? { digest(col).map(ContentID.init) }
}

protocol SQLValue {}
extension Int64: SQLValue {}
extension Int: SQLValue {}
extension UInt64: SQLValue {}
extension String: SQLValue {}
extension Array: SQLValue where Element == UInt8 {}
extension SHA256Digest: SQLValue {}
extension ChunkID: SQLValue {}
extension ContentID: SQLValue {}
