import BinaryCache
import ChunkStore
import Crypto
import Foundation
import Threads
import FuseMount
import Logging
import NixFormats
import NodeControl
import StoreFS
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Keeps the keeper holding this daemon's connection: at once, and again every few seconds, so a
/// keeper that restarted holds it again.
final class KeeperHolding: Sendable {
  let client: KeeperClient?
  let logger: Logger
  let record = Mutex<(@Sendable () -> Handover?)?>(nil)
  let stopped = Atomic<Bool>(false)

  init(socket: String?, logger: Logger) {
    client = socket.map { KeeperClient(path: $0) }
    self.logger = logger
  }

  /// `record` is nil until the connection has its INIT request (just after a new mount): until
  /// then the keeper is asked every few milliseconds, afterwards every five seconds.
  func start(_ record: @escaping @Sendable () -> Handover?, _ fd: Int32) {
    guard let client else { return }
    self.record.withLock { $0 = record }
    let logger = logger
    let thread = Thread { [self] in
      var warned = false
      while !stopped.load(ordering: .sequentiallyConsistent) {
        guard let handover = record() else {
          usleep(2_000)
          continue
        }
        do {
          let (r, _) = try client.exchange(.hold(handover), descriptor: fd, timeout: 5)
          if !r.ok { throw ControlError(socket: client.path, reason: r.reason ?? "refused") }
          if warned { logger.info("the keeper holds the FUSE connection again") }
          warned = false
        } catch {
          if !warned {
            logger.warning(
              "the keeper does not hold the FUSE connection: a crash of this daemon would break pods",
              metadata: ["error": "\(error)"])
          }
          warned = true
        }
        for _ in 0..<20 where !stopped.load(ordering: .sequentiallyConsistent) { usleep(250_000) }
      }
    }
    thread.name = "nixfs-keeper"
    thread.start()
  }

  /// Stops holding; `release` (a deliberate unmount) also tells the keeper to let go.
  func stop(release: Bool) {
    stopped.store(true, ordering: .sequentiallyConsistent)
    guard release, let client, let handover = record.withLock({ $0 })?() else { return }
    _ = try? client.send(.release(connection: handover.connection), timeout: 5)
  }
}
