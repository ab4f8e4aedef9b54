import Foundation
import SQLiteDatabase
import Synchronization

/// What a substituter said about a path, remembered for a while (Nix's narinfo disk cache).
enum CachedLookup: Equatable {
  case present(String)  // the narinfo text
  case absent
}

/// SQLite's message alone: the cache's own errors say which file and step failed.
struct NarInfoCacheFailure: SQLiteFailure {
  let message: String
  static func sqlite(path: String, operation: String, message: String) -> NarInfoCacheFailure { .init(message: message) }
}

/// Positive and negative narinfo lookups, per substituter, with TTLs. Persisted in SQLite under the
/// state directory so a restarted daemon does not ask the caches again; in memory without one.
/// Every entry is re-verified when used (trust settings may have changed since it was stored).
final class NarInfoCache: Sendable {
  let positiveTTL: Double
  let negativeTTL: Double
  private let db: Database<NarInfoCacheFailure>?
  /// The in-memory entries (without a state directory); held too while the database's cached
  /// statements are in use, one lookup or store at a time.
  private let memory = Mutex<[String: (CachedLookup, Double)]>([:])
  let path: String?

  init(stateDirectory: String?, positiveTTL: Double, negativeTTL: Double) throws(CacheError) {
    self.positiveTTL = positiveTTL
    self.negativeTTL = negativeTTL
    guard let dir = stateDirectory else {
      path = nil
      db = nil
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
    let handle: Database<NarInfoCacheFailure>
    do { handle = try Database(path: file, serialized: true, busyTimeout: 5000) } catch {
      throw .invalidConfiguration("cannot open narinfo cache \(file): \(error.message)")
    }
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
    do { try handle.exec(schema) } catch {
      throw .invalidConfiguration("cannot initialise narinfo cache \(file): \(error.message)")
    }
    db = handle
  }

  /// A fresh entry, or nil when there is none or it has expired.
  func lookup(substituter: String, hashPart: String, now: Double = Date().timeIntervalSince1970) -> CachedLookup? {
    let entry = memory.withLock { memory -> (CachedLookup, Double)? in
      if let db { return query(db, substituter: substituter, hashPart: hashPart) }
      return memory["\(substituter)\n\(hashPart)"]
    }
    guard let (value, timestamp) = entry else { return nil }
    let ttl = value == .absent ? negativeTTL : positiveTTL
    return now - timestamp < ttl ? value : nil
  }

  func store(substituter: String, hashPart: String, _ value: CachedLookup, now: Double = Date().timeIntervalSince1970) {
    memory.withLock { memory in
      guard let db else {
        memory["\(substituter)\n\(hashPart)"] = (value, now)
        return
      }
      let sql = "INSERT OR REPLACE INTO narinfos (substituter, hash_part, present, narinfo, timestamp) VALUES (?, ?, ?, ?, ?)"
      guard let stmt = try? db.prepare(sql) else { return }
      defer { db.resetAll() }
      switch value {
      case .present(let text): stmt.bind(substituter, hashPart, 1, text, now)
      case .absent: stmt.bind(substituter, hashPart, 0, nil, now)
      }
      // A failed write only costs a future re-fetch; never fail a lookup over it.
      _ = try? stmt.step()
    }
  }

  private func query(_ db: Database<NarInfoCacheFailure>, substituter: String, hashPart: String) -> (CachedLookup, Double)? {
    let sql = "SELECT present, narinfo, timestamp FROM narinfos WHERE substituter = ? AND hash_part = ?"
    guard let stmt = try? db.prepare(sql) else { return nil }
    // Reset once read: a statement left on its row would keep a read snapshot of the WAL open.
    defer { db.resetAll() }
    stmt.bind(substituter, hashPart)
    guard (try? stmt.step()) == true else { return nil }
    let timestamp = stmt.double(2)
    if stmt.int(0) == 0 { return (.absent, timestamp) }
    guard let text = stmt.text(1) else { return nil }
    return (.present(text), timestamp)
  }
}
