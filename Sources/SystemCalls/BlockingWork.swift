import Foundation

/// Runs blocking work (fsync and SQL at a commit, GC, fsck, a listener's start) on a thread of
/// its own and awaits it, so it never holds one of Swift concurrency's few threads: the
/// filesystem's replies and the serve's requests run there. The one async entry point for it.
public func blockingWork<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
  try await withCheckedThrowingContinuation { continuation in
    let thread = Thread { continuation.resume(with: Result { try body() }) }
    thread.name = "nixfs-blocking"
    thread.start()
  }
}
