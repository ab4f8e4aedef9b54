import Synchronization

/// One run of `work` per key at a time: callers that ask for a key already running share its
/// result instead of starting their own (one download of a path, one fetch of a chunk, however
/// many readers wait). A run leaves the table when it ends, so neither its value nor its failure
/// is remembered: the next call runs again. A waiter's cancellation does not cancel the run,
/// which others may still be waiting for.
public final class SingleFlight<Key: Hashable & Sendable, Value: Sendable>: Sendable {
  private let table = Mutex<[Key: Task<Value, any Error>]>([:])

  public init() {}

  public func run(_ key: Key, _ work: @escaping @Sendable () async throws -> Value) async throws -> Value {
    try await task(key, work).value
  }

  /// The run for `key`, started if none is in flight.
  public func task(_ key: Key, _ work: @escaping @Sendable () async throws -> Value) -> Task<Value, any Error> {
    table.withLock { table in
      if let running = table[key] { return running }
      // Its end takes the lock, held here until the task is in the table.
      let task = Task<Value, any Error> {
        defer { _ = self.table.withLock { $0.removeValue(forKey: key) } }
        return try await work()
      }
      table[key] = task
      return task
    }
  }

  /// Keys with a run in flight now.
  public var running: Int { table.withLock { $0.count } }
}
