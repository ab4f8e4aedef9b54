import ChunkStore
import Foundation
import Synchronization

/// Where the last misses of each partial file content were, to tell streaming readers (which
/// fetch ahead within the file) from the scattered reads of a program that maps its binary. A
/// miss that starts after the previous one and within what it fetched, a third time in a row, is
/// a stream (kernel readahead already sends the next window; fetching further pays for a long
/// stream). Only misses are recorded: reads of chunks that are here cost nothing. Bounded:
/// forgotten wholesale when full.
package final class ReadPattern: Sendable {
  private let last = Mutex<[ContentID: (start: UInt64, end: UInt64, streak: Int, misses: Int)]>([:])

  /// What a miss fetches besides the bytes asked for: `back` bytes before, `ahead` after.
  package struct Window: Equatable, Sendable {
    package let back: Int
    package let ahead: Int
  }

  /// The chunks around a scattered miss come in the same round trip (one batch request): a
  /// program's next faults are mostly near its last ones. A file that keeps missing in scattered
  /// places (an executable being run, not probed) gets a wider window; a streaming reader gets
  /// `streamAhead`.
  package static let near = Window(back: 64 << 10, ahead: 192 << 10)
  package static let executed = Window(back: 256 << 10, ahead: 768 << 10)
  package static let missesToExecuted = 8

  /// Records a miss and returns the window to fetch with it.
  package func window(_ content: ContentID, offset: UInt64, size: Int, streamAhead: Int) -> Window {
    last.withLock { m in
      let previous = m[content]
      let follows = previous.map { offset > $0.start && offset <= $0.end + (1 << 20) } ?? false
      let streak = follows ? (previous?.streak ?? 0) + 1 : 0
      let misses = (previous?.misses ?? 0) + 1
      let w: Window =
        streak >= 2 ? Window(back: 0, ahead: streamAhead) : misses > Self.missesToExecuted ? Self.executed : Self.near
      if m.count >= 4096 { m.removeAll(keepingCapacity: true) }
      m[content] = (offset, offset + UInt64(size) + UInt64(w.ahead), streak, misses)
      return w
    }
  }
}
