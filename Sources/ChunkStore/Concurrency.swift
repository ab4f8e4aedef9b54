import Foundation
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// A pthread readers–writer lock: reads share it, GC takes it exclusively while it deletes index
/// rows and punches holes, so no read can pread a range that is being freed.
final class RWLock: @unchecked Sendable {
  private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
  /// How many times the write side was taken: a reader that cached something under the read
  /// lock knows it is stale when this moved (GC, repair and sweeps all write).
  let writes = Atomic<UInt64>(0)
  init() { pthread_rwlock_init(lock, nil) }
  deinit {
    pthread_rwlock_destroy(lock)
    lock.deallocate()
  }
  func read<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_rdlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    return try body()
  }
  func write<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_wrlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    writes.add(1, ordering: .relaxed)
    return try body()
  }
}

/// Runs `body` holding the lock (an NSLock, or an NSCondition whose waits need it).
extension NSLocking {
  func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    lock()
    defer { unlock() }
    return try body()
  }
}
