internal import CSQLite
import Foundation
import Threads

/// Checkpoints the WAL on its own thread and connection. SQLite's automatic checkpoint runs
/// inside the COMMIT that crosses the threshold: that commit waits while the whole WAL is copied
/// into the database and synced (tens of MB after a path of many small inline files). Here the
/// copy overlaps whatever comes next instead; PASSIVE never blocks readers or the writer.
final class Checkpointer: Sendable {
  private let db: Database
  private let state = Locked((requested: false, stopping: false, running: true))
  /// WAL pages after a commit that trigger a checkpoint (SQLite's own default).
  static let threshold: Int32 = 1000

  init(path: String) throws(ChunkStoreError) {
    db = try Database(path: path)
    let t = Thread { [self] in loop() }
    t.name = "nixfs-checkpoint"
    t.start()
  }

  /// Takes over from the automatic checkpoint of `writer`, which must be detached before this
  /// object goes away.
  func attach(to writer: Database) {
    sqlite3_wal_hook(
      writer.handle,
      { context, _, _, pages in
        if pages >= Checkpointer.threshold, let context {
          Unmanaged<Checkpointer>.fromOpaque(context).takeUnretainedValue().request()
        }
        return SQLITE_OK
      }, Unmanaged.passUnretained(self).toOpaque())
  }

  func detach(from writer: Database) { sqlite3_wal_hook(writer.handle, nil, nil) }

  func request() {
    state.withLock { $0.requested = true }
    state.signal()
  }

  /// Stops the thread after any checkpoint in progress.
  func stop() {
    state.withLock { $0.stopping = true }
    state.broadcast()
    state.withLock(when: { !$0.running }) { _ in }
  }

  private func loop() {
    while state.withLock(when: { $0.requested || $0.stopping }, { s in
      s.requested = false
      return !s.stopping
    }) {
      _ = sqlite3_wal_checkpoint_v2(db.handle, nil, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
    }
    state.withLock { $0.running = false }
    state.broadcast()
  }
}
