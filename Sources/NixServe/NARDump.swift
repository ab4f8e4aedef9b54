import BinaryCache
import ChunkStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NixFormats
import Synchronization
import Threads

/// The NAR of a complete path, rebuilt from the chunk store on a thread of its own and handed over
/// 1 MiB at a time with at most four pieces ahead of the client: a slow client slows the dump
/// instead of filling memory. The dump re-checks the NarHash as it goes; a mismatch ends the
/// response early, and the client's own NarHash check then fails, as it must.
final class NARDump: Sendable {
  let stream: AsyncThrowingStream<ByteBuffer, any Error>
  private let continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation
  /// Pieces the dump may make before the client takes one, and whether the response ended.
  private let window = Locked((credit: 4, cancelled: false))

  init(path: StorePath, store: ChunkStore, counters: ServeCounters) {
    (stream, continuation) = AsyncThrowingStream<ByteBuffer, any Error>.makeStream()
    let thread = Thread { [self] in run(path: path, store: store, counters: counters) }
    thread.name = "nixfs-serve-nar"
    thread.start()
  }

  private func run(path: StorePath, store: ChunkStore, counters: ServeCounters) {
    do {
      try store.dump(path) { piece in
        let cancelled = window.withLock(when: { $0.credit > 0 || $0.cancelled }) { w -> Bool in
          w.credit -= 1
          return w.cancelled
        }
        if cancelled { throw CancellationError() }
        counters.narBytesServed.increment(by: Int64(piece.count))
        continuation.yield(ByteBuffer(bytes: piece))
      }
      continuation.finish()
    } catch {
      continuation.finish(throwing: error)
    }
  }

  /// The client took a piece: the dump may make another.
  func consumed() {
    window.withLock { $0.credit += 1 }
    window.signal()
  }

  /// The response ended (done, or the client went away): stop the dump.
  func cancel() {
    window.withLock { $0.cancelled = true }
    window.signal()
  }
}
