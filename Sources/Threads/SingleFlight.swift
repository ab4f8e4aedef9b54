import Foundation
import Synchronization

/// One run of `work` per key at a time: callers that ask for a key already running share its
/// result instead of starting their own (one download of a path, one fetch of a chunk, however
/// many readers wait). A run leaves the table when it ends, so neither its value nor its failure
/// is remembered: the next call runs again (a `NegativeCache` remembers what should be). A
/// waiter's cancellation does not cancel the run, which others may still be waiting for.
public final class SingleFlight<Key: Hashable & Sendable, Value: Sendable>: Sendable {
  private let table = Mutex<[Key: Task<Value, Never>]>([:])

  public init() {}

  /// The run for `key`, started if none is in flight.
  public func task(_ key: Key, _ work: @escaping @Sendable () async -> Value) -> Task<Value, Never> {
    table.withLock { table in
      if let running = table[key] { return running }
      // Its end takes the lock, held here until the task is in the table.
      let task = Task<Value, Never> {
        defer { _ = self.table.withLock { $0.removeValue(forKey: key) } }
        return await work()
      }
      table[key] = task
      return task
    }
  }

  public func value(_ key: Key, _ work: @escaping @Sendable () async -> Value) async -> Value {
    await task(key, work).value
  }

  /// Keys with a run in flight now.
  public var keys: [Key] { table.withLock { Array($0.keys) } }
}

extension SingleFlight {
  /// Runs a throwing `work` once per key; every waiter gets its value or its error.
  public func run<T: Sendable, E: Error>(
    _ key: Key, _ work: @escaping @Sendable () async throws(E) -> T
  ) async throws(E) -> T where Value == Result<T, E> {
    try await task(key) { () async -> Result<T, E> in
      do throws(E) { return .success(try await work()) } catch { return .failure(error) }
    }.value.get()
  }
}

/// Keys known to be missing, each for a while (a path no cache has): one definition of the
/// expiry for the filesystem and the serve.
public final class NegativeCache<Key: Hashable & Sendable>: Sendable {
  private let entries = Mutex<[Key: ContinuousClock.Instant]>([:])
  /// How long an entry holds, unless `remember` says otherwise.
  public let lifetime: Duration

  public init(lifetime: Duration) { self.lifetime = lifetime }

  public func remember(_ key: Key, for duration: Duration? = nil) {
    let until = ContinuousClock.now + (duration ?? lifetime)
    entries.withLock { e in
      // A crude bound: the oldest knowledge is the cheapest to lose.
      if e.count >= 100_000 { e.removeAll(keepingCapacity: true) }
      e[key] = until
    }
  }

  /// Whether `key` is remembered as missing now; an expired entry is dropped.
  public func contains(_ key: Key) -> Bool {
    entries.withLock { e in
      guard let until = e[key] else { return false }
      if until > ContinuousClock.now { return true }
      e[key] = nil
      return false
    }
  }

  public func forget(_ key: Key) { _ = entries.withLock { $0.removeValue(forKey: key) } }
}
