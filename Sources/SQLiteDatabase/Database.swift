// Public: the small wrappers below are inlinable, so the callers' hot loops (a commit binds
// thousands of rows, a cold read runs three statements) call SQLite directly.
import CSQLite
import Foundation

/// How a user of this wrapper reports SQLite's failures: as its own error, made from the
/// database's path, what was being done and SQLite's message. (Typed throws then stay typed in
/// the caller, and its messages read as they did when each module had its own wrapper.)
public protocol SQLiteFailure: Error {
  static func sqlite(path: String, operation: String, message: String) -> Self
}

/// A thin SQLite connection: prepared statements cached per SQL text. Shared by the chunk store's
/// index and the narinfo cache.
public final class Database<Failure: SQLiteFailure>: @unchecked Sendable {
  public let handle: OpaquePointer
  public let path: String
  @usableFromInline var statements: [String: Statement<Failure>] = [:]

  /// `serialized`: SQLite's own mutex on every call (FULLMUTEX), for a connection several threads
  /// may use; without it (NOMUTEX) one thread at a time must, as the chunk store's pool ensures.
  public init(path: String, readOnly: Bool = false, serialized: Bool = false, busyTimeout: Int32 = 30_000) throws(Failure) {
    var db: OpaquePointer?
    let flags =
      (readOnly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
      | (serialized ? SQLITE_OPEN_FULLMUTEX : SQLITE_OPEN_NOMUTEX)
    let rc = sqlite3_open_v2(path, &db, flags, nil)
    guard rc == SQLITE_OK, let db else {
      let msg = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
      if let db { sqlite3_close_v2(db) }
      throw .sqlite(path: path, operation: "open", message: msg)
    }
    handle = db
    self.path = path
    sqlite3_busy_timeout(db, busyTimeout)
    sqlite3_extended_result_codes(db, 1)
  }

  deinit {
    for s in statements.values { sqlite3_finalize(s.handle) }
    sqlite3_close_v2(handle)
  }

  @inlinable public func error(_ operation: String) -> Failure {
    .sqlite(path: path, operation: operation, message: String(cString: sqlite3_errmsg(handle)))
  }

  public func exec(_ sql: String) throws(Failure) {
    var err: UnsafeMutablePointer<CChar>?
    if sqlite3_exec(handle, sql, nil, nil, &err) != SQLITE_OK {
      let msg = err.map { String(cString: $0) } ?? "unknown"
      sqlite3_free(err)
      throw .sqlite(path: path, operation: String(sql.prefix(60)), message: msg)
    }
  }

  /// A cached prepared statement, reset and with bindings cleared.
  @inlinable public func prepare(_ sql: String) throws(Failure) -> Statement<Failure> {
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
  public func transaction<T>(_ body: () throws -> T) throws -> T {
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
  @inlinable public func resetAll() {
    for s in statements.values { sqlite3_reset(s.handle) }
  }

  @inlinable public var changes: Int { Int(sqlite3_changes(handle)) }
  @inlinable public var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }
}

public final class Statement<Failure: SQLiteFailure> {
  @usableFromInline let handle: OpaquePointer
  @usableFromInline unowned let db: Database<Failure>
  @usableFromInline init(handle: OpaquePointer, db: Database<Failure>) {
    self.handle = handle
    self.db = db
  }

  @discardableResult
  @inlinable public func bind(_ values: (any SQLValue)?...) -> Statement {
    for (i, v) in values.enumerated() {
      let idx = Int32(i + 1)
      if let v { v.bind(to: self, at: idx) } else { setNull(idx) }
    }
    return self
  }

  // Typed binds for hot loops: the variadic `bind` boxes every value in an existential, which
  // costs more than SQLite's own work for a small row.
  /// Resets for another execution, keeping the bindings.
  @discardableResult
  @inlinable public func again() -> Statement {
    sqlite3_reset(handle)
    return self
  }
  @inlinable public func set(_ idx: Int32, _ v: Int64) { sqlite3_bind_int64(handle, idx, v) }
  @inlinable public func set(_ idx: Int32, _ v: Int) { sqlite3_bind_int64(handle, idx, Int64(v)) }
  @inlinable public func set(_ idx: Int32, _ v: UInt64) { sqlite3_bind_int64(handle, idx, Int64(bitPattern: v)) }
  @inlinable public func set(_ idx: Int32, _ v: Double) { sqlite3_bind_double(handle, idx, v) }
  @inlinable public func set(_ idx: Int32, _ v: String) { sqlite3_bind_text(handle, idx, v, -1, nixfs_sqlite_transient()) }
  @inlinable public func setNull(_ idx: Int32) { sqlite3_bind_null(handle, idx) }
  @inlinable public func set(_ idx: Int32, blob x: [UInt8]) {
    x.withUnsafeBytes { b in
      // A non-null pointer even when empty: a null one would bind NULL, not an empty blob.
      let p = b.baseAddress ?? UnsafeRawPointer(bitPattern: 1)
      _ = sqlite3_bind_blob(handle, idx, p, Int32(b.count), nixfs_sqlite_transient())
    }
  }
  /// Binds a blob copied from `bytes` (which need not outlive the call).
  @inlinable public func set(_ idx: Int32, blobBytes bytes: UnsafeRawBufferPointer) {
    _ = sqlite3_bind_blob(handle, idx, bytes.baseAddress, Int32(bytes.count), nixfs_sqlite_transient())
  }

  /// Steps once: true when a row is available.
  @inlinable public func step() throws(Failure) -> Bool {
    let rc = sqlite3_step(handle)
    if rc == SQLITE_ROW { return true }
    if rc == SQLITE_DONE { return false }
    throw db.error("step \(String(cString: sqlite3_sql(handle)).prefix(60))")
  }

  @inlinable public func run() throws(Failure) {
    while try step() {}
  }

  @inlinable public func int(_ col: Int32) -> Int64 { sqlite3_column_int64(handle, col) }
  @inlinable public func double(_ col: Int32) -> Double { sqlite3_column_double(handle, col) }
  @inlinable public func isNull(_ col: Int32) -> Bool { sqlite3_column_type(handle, col) == SQLITE_NULL }
  @inlinable public func text(_ col: Int32) -> String? {
    guard let p = sqlite3_column_text(handle, col) else { return nil }
    return String(cString: p)
  }
  @inlinable public func blob(_ col: Int32) -> [UInt8]? {
    if isNull(col) { return nil }
    let n = Int(sqlite3_column_bytes(handle, col))
    guard n > 0, let p = sqlite3_column_blob(handle, col) else { return [] }
    return Array(UnsafeRawBufferPointer(start: p, count: n))
  }
  /// A blob column's bytes in place, valid until the statement steps or resets; nil for NULL (or
  /// an empty blob).
  @inlinable public func blobBytes(_ col: Int32) -> UnsafeRawBufferPointer? {
    let n = Int(sqlite3_column_bytes(handle, col))
    guard let p = sqlite3_column_blob(handle, col) else { return nil }
    return UnsafeRawBufferPointer(start: p, count: n)
  }
}

/// A value the variadic `bind` takes; other modules make their own types bindable.
public protocol SQLValue {
  func bind<F>(to statement: Statement<F>, at index: Int32)
}

extension Int64: SQLValue {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension Int: SQLValue {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension UInt64: SQLValue {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension Double: SQLValue {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension String: SQLValue {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension Array: SQLValue where Element == UInt8 {
  @inlinable public func bind<F>(to statement: Statement<F>, at index: Int32) { statement.set(index, blob: self) }
}
