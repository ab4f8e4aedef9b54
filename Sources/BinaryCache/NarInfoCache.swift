import CSQLite
import Foundation

/// What a substituter said about a path, remembered for a while (Nix's narinfo disk cache).
enum CachedLookup: Equatable {
  case present(String)  // the narinfo text
  case absent
}

/// Positive and negative narinfo lookups, per substituter, with TTLs. Persisted in SQLite under the
/// state directory so a restarted daemon does not ask the caches again; in memory without one.
/// Every entry is re-verified when used (trust settings may have changed since it was stored).
final class NarInfoCache: @unchecked Sendable {
  let positiveTTL: Double
  let negativeTTL: Double
  private let lock = NSLock()
  private var db: OpaquePointer? = nil
  private var memory: [String: (CachedLookup, Double)] = [:]
  let path: String?

  init(stateDirectory: String?, positiveTTL: Double, negativeTTL: Double) throws(CacheError) {
    self.positiveTTL = positiveTTL
    self.negativeTTL = negativeTTL
    guard let dir = stateDirectory else {
      path = nil
      return
    }
    do {
      // Owner-only, like the rest of the state directory (the chunk store tightens it too).
      try FileManager.default.createDirectory(
        atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    } catch {
      throw .invalidConfiguration("cannot create state directory \(dir): \(error.localizedDescription)")
    }
    let file = (dir as NSString).appendingPathComponent("narinfo-cache.sqlite")
    path = file
    // Created owner-only (SQLite's -wal and -shm then take the same mode); an older cache made
    // 0644 is tightened.
    let fd = open(file, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
    guard fd >= 0, fchmod(fd, 0o600) == 0 else {
      let reason = String(cString: strerror(errno))
      if fd >= 0 { close(fd) }
      throw .invalidConfiguration("cannot create narinfo cache \(file): \(reason)")
    }
    close(fd)
    var handle: OpaquePointer? = nil
    let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX
    guard sqlite3_open_v2(file, &handle, flags, nil) == SQLITE_OK, let handle else {
      let message = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
      sqlite3_close(handle)
      throw .invalidConfiguration("cannot open narinfo cache \(file): \(message)")
    }
    db = handle
    sqlite3_busy_timeout(handle, 5000)
    // WAL without fsync per commit: losing the last lookups in a power cut only costs a re-fetch.
    let schema = """
      PRAGMA journal_mode=WAL;
      PRAGMA synchronous=NORMAL;
      CREATE TABLE IF NOT EXISTS narinfos (
        substituter TEXT NOT NULL,
        hash_part TEXT NOT NULL,
        present INTEGER NOT NULL,
        narinfo TEXT,
        timestamp REAL NOT NULL,
        PRIMARY KEY (substituter, hash_part)
      ) WITHOUT ROWID;
      """
    if sqlite3_exec(handle, schema, nil, nil, nil) != SQLITE_OK {
      let message = String(cString: sqlite3_errmsg(handle))
      sqlite3_close(handle)
      db = nil
      throw .invalidConfiguration("cannot initialise narinfo cache \(file): \(message)")
    }
  }

  deinit {
    if let db { sqlite3_close(db) }
  }

  /// A fresh entry, or nil when there is none or it has expired.
  func lookup(substituter: String, hashPart: String, now: Double = Date().timeIntervalSince1970) -> CachedLookup? {
    lock.lock()
    defer { lock.unlock() }
    let entry: (CachedLookup, Double)?
    if let db {
      entry = query(db, substituter: substituter, hashPart: hashPart)
    } else {
      entry = memory["\(substituter)\n\(hashPart)"]
    }
    guard let (value, timestamp) = entry else { return nil }
    let ttl = value == .absent ? negativeTTL : positiveTTL
    return now - timestamp < ttl ? value : nil
  }

  func store(substituter: String, hashPart: String, _ value: CachedLookup, now: Double = Date().timeIntervalSince1970) {
    lock.lock()
    defer { lock.unlock() }
    guard let db else {
      memory["\(substituter)\n\(hashPart)"] = (value, now)
      return
    }
    var stmt: OpaquePointer? = nil
    let sql = "INSERT OR REPLACE INTO narinfos (substituter, hash_part, present, narinfo, timestamp) VALUES (?, ?, ?, ?, ?)"
    guard sqlite3_prepare_v2(db, sql, -1, &stmt, nil) == SQLITE_OK else { return }
    defer { sqlite3_finalize(stmt) }
    let transient = nixfs_sqlite_transient()
    sqlite3_bind_text(stmt, 1, substituter, -1, transient)
    sqlite3_bind_text(stmt, 2, hashPart, -1, transient)
    switch value {
    case .present(let text):
      sqlite3_bind_int(stmt, 3, 1)
      sqlite3_bind_text(stmt, 4, text, -1, transient)
    case .absent:
      sqlite3_bind_int(stmt, 3, 0)
      sqlite3_bind_null(stmt, 4)
    }
    sqlite3_bind_double(stmt, 5, now)
    // A failed write only costs a future re-fetch; never fail a lookup over it.
    _ = sqlite3_step(stmt)
  }

  private func query(_ db: OpaquePointer, substituter: String, hashPart: String) -> (CachedLookup, Double)? {
    var stmt: OpaquePointer? = nil
    let sql = "SELECT present, narinfo, timestamp FROM narinfos WHERE substituter = ? AND hash_part = ?"
    guard sqlite3_prepare_v2(db, sql, -1, &stmt, nil) == SQLITE_OK else { return nil }
    defer { sqlite3_finalize(stmt) }
    let transient = nixfs_sqlite_transient()
    sqlite3_bind_text(stmt, 1, substituter, -1, transient)
    sqlite3_bind_text(stmt, 2, hashPart, -1, transient)
    guard sqlite3_step(stmt) == SQLITE_ROW else { return nil }
    let timestamp = sqlite3_column_double(stmt, 2)
    if sqlite3_column_int(stmt, 0) == 0 { return (.absent, timestamp) }
    guard let text = sqlite3_column_text(stmt, 1) else { return nil }
    return (.present(String(cString: text)), timestamp)
  }
}
