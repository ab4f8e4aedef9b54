import Foundation
import Synchronization
import Testing
import Threads

@Suite struct LockedTests {
  @Test func aWaiterWakesWhenAnotherThreadChangesTheState() async throws {
    let box = Locked(0)
    let waiter = Thread {
      Thread.sleep(forTimeInterval: 0.05)
      box.withLock { $0 = 42 }
      box.broadcast()
    }
    waiter.start()
    let seen = try await blockingWork { box.withLock(when: { $0 != 0 }) { $0 } }
    #expect(seen == 42)
  }

  @Test func aTimedWaitGivesUpAfterItsTimeout() async throws {
    let box = Locked(false)
    let started = ContinuousClock.now
    let ready = try await blockingWork { box.withLock(when: { $0 }, timeout: 0.2) { _, ready in ready } }
    let waited = ContinuousClock.now - started
    #expect(!ready)
    #expect(waited >= .milliseconds(190))
    // Ready at once: no wait at all.
    box.withLock { $0 = true }
    #expect(try await blockingWork { box.withLock(when: { $0 }, timeout: 5) { _, ready in ready } })
  }
}

@Suite struct WorkerPoolTests {
  @Test func aJobThatWaitsForALaterJobDoesNotDeadlock() async throws {
    let pool = WorkerPool<Void>(name: "test-pool", idleSeconds: 1, makeResource: { () }, releaseResource: { _ in })
    let flag = Locked(false)
    let done = Locked(false)
    pool.submit { _ in
      flag.withLock(when: { $0 }) { _ in }
      done.withLock { $0 = true }
      done.broadcast()
    }
    pool.submit { _ in
      flag.withLock { $0 = true }
      flag.broadcast()
    }
    let finished = try await blockingWork { done.withLock(when: { $0 }, timeout: 10) { _, ready in ready } }
    #expect(finished)
  }

  @Test func maxThreadsBoundsConcurrencyAndEachThreadKeepsItsResource() async throws {
    let made = Atomic<Int>(0)
    let pool = WorkerPool<Int>(
      name: "test-bounded", maxThreads: 2, idleSeconds: 1,
      makeResource: { made.add(1, ordering: .relaxed).newValue }, releaseResource: { _ in })
    let state = Locked((running: 0, most: 0, finished: 0, resources: Set<Int>()))
    for _ in 0..<20 {
      pool.submit { resource in
        state.withLock {
          $0.running += 1
          $0.most = max($0.most, $0.running)
          $0.resources.insert(resource)
        }
        Thread.sleep(forTimeInterval: 0.01)
        state.withLock {
          $0.running -= 1
          $0.finished += 1
        }
        state.broadcast()
      }
    }
    let all = try await blockingWork { state.withLock(when: { $0.finished == 20 }, timeout: 20) { s, _ in s } }
    #expect(all.finished == 20)
    #expect(all.most <= 2)
    #expect(all.resources.count <= 2)
    #expect(made.load(ordering: .relaxed) <= 2)
  }
}

@Suite struct SerialWorkTests {
  @Test func jobsNeverOverlapAndAFailureDoesNotStopTheNext() async throws {
    struct Refused: Error {}
    let serial = SerialWork()
    let state = Locked((running: 0, most: 0, ran: 0))
    try await withThrowingTaskGroup(of: Void.self) { group in
      for n in 0..<12 {
        group.addTask {
          do {
            try await serial.run {
              state.withLock {
                $0.running += 1
                $0.most = max($0.most, $0.running)
              }
              Thread.sleep(forTimeInterval: 0.01)
              state.withLock {
                $0.running -= 1
                $0.ran += 1
              }
              if n % 3 == 0 { throw Refused() }
            }
            #expect(n % 3 != 0)
          } catch is Refused {
            #expect(n % 3 == 0)
          }
        }
      }
      try await group.waitForAll()
    }
    let s = state.withLock { $0 }
    #expect(s.ran == 12)
    #expect(s.most == 1)
  }
}

/// The chunk store's async front runs blocking work on an executor of its own: however many
/// callers wait on blocked jobs, at most its threads block, and the callers hold no cooperative
/// thread while they wait (if they did, this test could not go on while twelve of them wait).
@Suite struct BlockingExecutorTests {
  // The limit catches a deadlock, not slowness: under the full run this test's threads may stand
  // still for a minute.
  @Test(.timeLimit(.minutes(10))) func blockedJobsNeverHoldTheCooperativePool() async throws {
    let executor = BlockingExecutor(name: "test-front", threads: 2)
    let running = Locked((now: 0, most: 0, done: 0))
    let gate = Locked(false)
    let slow = Task {
      try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<12 {
          group.addTask {
            try await executor.run {
              running.withLock { $0.now += 1; $0.most = max($0.most, $0.now) }
              // A writer lock held elsewhere, a slow fsync: blocked until the test lets go.
              while !gate.withLock({ $0 }) { usleep(1000) }
              running.withLock { $0.now -= 1; $0.done += 1 }
            }
          }
        }
        try await group.waitForAll()
      }
    }
    while running.withLock({ $0.now }) < 2 { try await Task.sleep(for: .milliseconds(2)) }
    // Cheap async work while both threads are blocked and ten more callers wait for them.
    for _ in 0..<10 { try await Task.sleep(for: .milliseconds(5)) }
    #expect(running.withLock { $0.now == 2 && $0.done == 0 }, "only the executor's threads run jobs")
    gate.withLock { $0 = true }
    try await slow.value
    #expect(running.withLock { $0.most == 2 && $0.done == 12 })
  }
}

/// The one "one run per key" table and the one negative cache, their semantics tested once.
@Suite struct SingleFlightTests {
  struct Failure: Error, Equatable { let n: Int }

  @Test func concurrentCallersShareOneRunAndItsFailureIsNotRemembered() async throws {
    let flight = SingleFlight<String, Result<Int, Failure>>()
    let runs = Locked(0)
    let gate = Locked(false)
    @Sendable func work() async throws(Failure) -> Int {
      let n = runs.withLock { $0 += 1; return $0 }
      // Held until every caller has joined.
      while !gate.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(2)) }
      throw Failure(n: n)
    }
    let callers = (0..<8).map { _ in
      Task { () async -> Result<Int, Failure> in
        do throws(Failure) { return .success(try await flight.run("k") { () async throws(Failure) in try await work() }) } catch {
          return .failure(error)
        }
      }
    }
    while flight.keys != ["k"] { try await Task.sleep(for: .milliseconds(1)) }
    try await Task.sleep(for: .milliseconds(20))
    gate.withLock { $0 = true }
    for c in callers { #expect(await c.value == .failure(Failure(n: 1)), "every waiter gets the one run's failure") }
    #expect(runs.withLock { $0 } == 1)
    #expect(flight.keys.isEmpty, "a finished run leaves the table")
    // The next call runs again: failures are not remembered.
    let again = await flight.value("k") { .success(7) }
    #expect(again == .success(7))
  }

  @Test func aCancelledWaiterDoesNotCancelTheRun() async throws {
    let flight = SingleFlight<Int, Int>()
    let finished = Locked(false)
    let first = Task {
      await flight.value(1) {
        try? await Task.sleep(for: .milliseconds(100))
        finished.withLock { $0 = true }
        return 42
      }
    }
    while flight.keys.isEmpty { try await Task.sleep(for: .milliseconds(1)) }
    first.cancel()
    let second = await flight.value(1) { 0 }
    #expect(second == 42, "a second waiter joins the run the first one left")
    #expect(finished.withLock { $0 })
  }

  @Test func theNegativeCacheForgetsAfterItsLifetime() async throws {
    let missing = NegativeCache<String>(lifetime: .milliseconds(50))
    #expect(!missing.contains("a"))
    missing.remember("a")
    missing.remember("b", for: .seconds(3600))
    #expect(missing.contains("a") && missing.contains("b"))
    try await Task.sleep(for: .milliseconds(80))
    #expect(!missing.contains("a"), "expired")
    #expect(missing.contains("b"))
    missing.forget("b")
    #expect(!missing.contains("b"))
  }
}
