import ChunkStore
import Foundation
import Synchronization
/// Where the last misses of each partial file content were, to tell streaming readers (which
/// fetch ahead within the file) from the scattered reads of a program that maps its binary. Only
/// misses are recorded: reads of chunks that are here cost nothing. Bounded: forgotten wholesale
/// when full.
package final class ReadPattern: Sendable {
  private let last = Mutex<[ContentID: (start: UInt64, end: UInt64, streak: Int)]>([:])

  /// Records a miss; true from the third miss in a row that starts after the previous one and
  /// within what it fetched (its bytes, plus `ahead` if it fetched ahead). Kernel readahead already
  /// sends the next window of a sequential read; fetching further only pays for a long stream.
  package func miss(_ content: ContentID, offset: UInt64, size: Int, ahead: Int) -> Bool {
    last.withLock { m in
      // The last chunk fetched may reach up to a chunk's size past what was asked for.
      let follows = m[content].map { offset > $0.start && offset <= $0.end + (1 << 20) } ?? false
      let streak = follows ? (m[content]?.streak ?? 0) + 1 : 0
      let streaming = streak >= 2
      if m.count >= 4096 { m.removeAll(keepingCapacity: true) }
      m[content] = (offset, offset + UInt64(size) + UInt64(streaming ? ahead : 0), streak)
      return streaming
    }
  }
}
