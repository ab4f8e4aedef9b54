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
