import Foundation
import NixFormats

extension ChunkStore {
  /// Pins a path for as long as this process runs (e.g. while files of it are open). Counted.
  public func pin(_ path: StorePath) { bookkeeping.withLock { $0.memoryPins[path, default: 0] += 1 } }
  public func unpin(_ path: StorePath) {
    bookkeeping.withLock {
      let n = ($0.memoryPins[path] ?? 1) - 1
      $0.memoryPins[path] = n <= 0 ? nil : n
    }
  }

  /// Pins a path durably on behalf of `holder` (e.g. a published volume ID) until `unpin`.
  public func pin(_ path: StorePath, holder: String) throws {
    try withWriter { db in try db.insertPin(path.path, holder: holder) }
  }
  /// Pins a whole closure for `holder` in one transaction (one fsync, not one per path).
  public func pin(_ paths: [StorePath], holder: String) throws {
    try withWriter { db in
      try db.transaction {
        for p in paths { try db.insertPin(p.path, holder: holder) }
      }
    }
  }
  public func unpin(_ path: StorePath, holder: String) throws {
    try withWriter { db in try db.deletePin(path.path, holder: holder) }
  }
  public func unpinAll(holder: String) throws {
    try withWriter { db in try db.deletePins(holder: holder) }
  }

  /// Marks a path used now, for LRU eviction. Cheap: kept in memory and written at GC or close.
  public func touch(_ path: StorePath) { bookkeeping.withLock { $0.touches[path] = now() } }

  func flushTouches() {
    guard isWriter else { return }
    let pending = bookkeeping.withLock { b -> [StorePath: Int64] in
      defer { b.touches = [:] }
      return b.touches
    }
    guard !pending.isEmpty else { return }
    _ = try? withWriter { db in
      try db.transaction {
        for (p, t) in pending { try db.touchPath(p.path, at: t) }
      }
    }
  }

  /// As the index spells them: GC compares them with its rows.
  func pinnedPaths(_ db: Database) throws -> Set<String> {
    var out = Set(bookkeeping.withLock { ($0.memoryPins.keys.map(\.path) + $0.ingesting.map(\.path)) })
    out.formUnion(try db.pinnedStorePaths())
    return out
  }

  /// Paths GC must keep now (durable pins, open files, ingests), for the daemon's gauges.
  public func pinnedPathCount() -> Int { (try? withReader { db in try pinnedPaths(db).count }) ?? 0 }
}

/// Seconds since the epoch, for LRU.
func now() -> Int64 { Int64(Date().timeIntervalSince1970) }
