import Foundation
import Synchronization

/// A bounded cache of decompressed chunks, least recently used out first.
final class ChunkCache: Sendable {
  private struct State {
    var entries: [ChunkID: (bytes: [UInt8], tick: UInt64)] = [:]
    var size = 0
    var tick: UInt64 = 0
  }
  private let state = Mutex(State())
  let budget: Int

  init(budget: Int) { self.budget = budget }

  func get(_ id: ChunkID) -> [UInt8]? {
    state.withLock { s in
      guard let e = s.entries[id] else { return nil }
      s.tick += 1
      s.entries[id] = (e.bytes, s.tick)
      return e.bytes
    }
  }

  func put(_ id: ChunkID, _ bytes: [UInt8]) {
    guard bytes.count <= budget else { return }
    let budget = budget
    state.withLock { s in
      s.tick += 1
      if s.entries.updateValue((bytes, s.tick), forKey: id) == nil { s.size += bytes.count }
      if s.size > budget {
        // Evict the oldest quarter at once so eviction cost amortises over many puts.
        let sorted = s.entries.sorted { $0.value.tick < $1.value.tick }
        for (k, v) in sorted.prefix(max(1, sorted.count / 4)) {
          s.entries[k] = nil
          s.size -= v.bytes.count
        }
      }
    }
  }

  var bytes: Int { state.withLock { $0.size } }
}
