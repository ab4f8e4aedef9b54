import Foundation

/// Threads that take jobs from one queue: the process's pool for blocking work, and the cache
/// client's libcurl workers (each with its own easy handle, the thread's `Resource`).
///
/// A thread is started whenever no idle one can take a job (up to `maxThreads`), so a job that
/// waits for another never waits for a free thread; idle threads are kept a short while for the
/// next job, then exit, so an unused pool holds no threads.
public final class WorkerPool<Resource>: @unchecked Sendable {
  public typealias Job = @Sendable (Resource) -> Void

  struct State {
    /// Pending jobs from `head` on; a taken slot is cleared at once so a finished job's captures go.
    var jobs: [Job?] = []
    var head = 0
    var threads = 0
    var idle = 0
    var pending: Int { jobs.count - head }
  }

  private let state = Locked(State())
  private let name: String
  private let maxThreads: Int
  private let idleSeconds: Double
  /// Made by each thread when it starts (nil: the thread cannot work and exits), given to its jobs.
  private let makeResource: @Sendable () -> Resource?
  private let releaseResource: @Sendable (Resource) -> Void

  public init(
    name: String, maxThreads: Int = .max, idleSeconds: Double,
    makeResource: @escaping @Sendable () -> Resource?, releaseResource: @escaping @Sendable (Resource) -> Void
  ) {
    self.name = name
    self.maxThreads = max(1, maxThreads)
    self.idleSeconds = idleSeconds
    self.makeResource = makeResource
    self.releaseResource = releaseResource
  }

  /// Runs `job` on a pool thread.
  public func submit(_ job: @escaping Job) {
    let maxThreads = maxThreads
    let startThread = state.withLock { s -> Bool in
      s.jobs.append(job)
      guard s.idle < s.pending && s.threads < maxThreads else { return false }
      s.threads += 1
      return true
    }
    if startThread {
      let thread = Thread { [self] in work() }
      thread.name = name
      thread.start()
    } else {
      state.signal()
    }
  }

  private func work() {
    guard let resource = makeResource() else {
      state.withLock { $0.threads -= 1 }
      return
    }
    defer { releaseResource(resource) }
    while true {
      // Counted idle before it waits: a submit in between sees it and signals, and the wait looks
      // at the queue before it sleeps, so no wake-up is lost.
      state.withLock { $0.idle += 1 }
      let job: Job? = state.withLock(when: { $0.pending > 0 }, timeout: idleSeconds) { s, ready in
        s.idle -= 1
        guard ready else {
          s.threads -= 1
          return nil
        }
        defer {
          s.jobs[s.head] = nil
          s.head += 1
          if s.head > 64 && s.head * 2 > s.jobs.count {
            s.jobs.removeFirst(s.head)
            s.head = 0
          }
        }
        return s.jobs[s.head]
      }
      guard let job else { return }
      job(resource)
    }
  }
}

/// The pool for blocking work that is not the chunk store's async callers' (the store's front has
/// its own bounded executor): a commit's fdatasync, arriving chunks' pack writes, a listener's
/// start, the control client, the CSI plugin's mounts, making a closure's Nix state, so it never
/// holds one of Swift concurrency's few threads. Not bounded on purpose: some of its jobs wait for
/// others (a commit for its fdatasync), and a bound would let them wait for a free thread forever.
public let blockingPool = WorkerPool<Void>(
  name: "nixfs-blocking", idleSeconds: 10, makeResource: { () }, releaseResource: { _ in })

/// Runs blocking work on the blocking pool and awaits it: the one async entry point for it.
public func blockingWork<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
  try await withCheckedThrowingContinuation { continuation in
    blockingPool.submit { continuation.resume(with: Result { try body() }) }
  }
}

/// A bounded pool of threads for one kind of blocking work, awaited from async code: the chunk
/// store's front (SQLite, pread, fsync) owns one, so however many requests wait on the store,
/// at most `threads` threads block in it and Swift concurrency's few threads never do.
public final class BlockingExecutor: Sendable {
  private let pool: WorkerPool<Void>
  public let threads: Int

  public init(name: String, threads: Int) {
    self.threads = max(1, threads)
    pool = WorkerPool<Void>(
      name: name, maxThreads: self.threads, idleSeconds: 10, makeResource: { () }, releaseResource: { _ in })
  }

  public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
      pool.submit { continuation.resume(with: Result { try body() }) }
    }
  }
}
