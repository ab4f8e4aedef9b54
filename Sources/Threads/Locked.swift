import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// The one lock box for state that is shared by reference or waited on: the state is reachable
/// only inside `withLock`, and a waiter sleeps on the same lock until a predicate over the state
/// holds. (State a value owns and never waits on sits in the standard library's `Mutex`.)
///
/// A pthread mutex and condition variable, the condition on the monotonic clock so a timed wait
/// is not moved by a change of the wall clock.
public final class Locked<State>: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
  // Guarded by `mutex`.
  private var state: State

  public init(_ state: State) {
    self.state = state
    pthread_mutex_init(mutex, nil)
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(condition, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(condition)
    pthread_mutex_destroy(mutex)
    condition.deallocate()
    mutex.deallocate()
  }

  /// Runs `body` on the state, holding the lock.
  public func withLock<R, E: Error>(_ body: (inout State) throws(E) -> R) throws(E) -> R {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body(&state)
  }

  /// Waits until `ready` holds for the state, then runs `body` on it, holding the lock throughout
  /// (the lock is released only while waiting).
  public func withLock<R, E: Error>(
    when ready: (borrowing State) -> Bool, _ body: (inout State) throws(E) -> R
  ) throws(E) -> R {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while !ready(state) { pthread_cond_wait(condition, mutex) }
    return try body(&state)
  }

  /// As `withLock(when:_:)`, giving up waiting after `seconds`: `body` then runs with
  /// `ready == false`.
  public func withLock<R, E: Error>(
    when ready: (borrowing State) -> Bool, timeout seconds: Double,
    _ body: (inout State, _ ready: Bool) throws(E) -> R
  ) throws(E) -> R {
    var deadline = timespec()
    clock_gettime(CLOCK_MONOTONIC, &deadline)
    let whole = seconds.rounded(.down)
    deadline.tv_sec += Int(whole)
    deadline.tv_nsec += Int((seconds - whole) * 1e9)
    if deadline.tv_nsec >= 1_000_000_000 {
      deadline.tv_sec += 1
      deadline.tv_nsec -= 1_000_000_000
    }
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while !ready(state) {
      if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT {
        return try body(&state, ready(state))
      }
    }
    return try body(&state, true)
  }

  /// Wakes one waiter to look at the state again. Call it after changing the state.
  public func signal() { pthread_cond_signal(condition) }

  /// Wakes every waiter to look at the state again. Call it after changing the state.
  public func broadcast() { pthread_cond_broadcast(condition) }
}
