import Synchronization

/// Blocking jobs run one at a time, in the order they came, on the blocking pool, each awaited
/// by its caller: a serial queue that holds no thread while it waits (the CSI's publishes and
/// unpublishes, which kubelet may retry while one still runs).
public final class SerialWork: Sendable {
  /// Ends when the last job given so far has.
  private let tail = Mutex<Task<Void, Never>?>(nil)

  public init() {}

  public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    let job = tail.withLock { tail -> Task<Result<T, any Error>, Never> in
      let previous = tail
      let job = Task { () -> Result<T, any Error> in
        await previous?.value
        do { return .success(try await blockingWork(body)) } catch { return .failure(error) }
      }
      tail = Task { _ = await job.value }
      return job
    }
    return try await job.value.get()
  }
}
