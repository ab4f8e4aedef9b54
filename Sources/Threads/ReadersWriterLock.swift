import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// A pthread readers–writer lock: reads share it, one writer excludes them (the chunk store's GC
/// takes it while it deletes index rows and punches holes, so no read can pread a range being
/// freed). `Locked` and `Mutex` have no shared side.
public final class ReadersWriterLock: @unchecked Sendable {
  private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
  /// How many times the write side was taken: a reader that cached something under the read
  /// lock knows it is stale when this moved.
  public let writes = Atomic<UInt64>(0)
  public init() { pthread_rwlock_init(lock, nil) }
  deinit {
    pthread_rwlock_destroy(lock)
    lock.deallocate()
  }
  public func read<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_rdlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    return try body()
  }
  public func write<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_wrlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    writes.add(1, ordering: .relaxed)
    return try body()
  }
}
