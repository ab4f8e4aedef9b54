import Foundation

/// A bounded cache of decompressed chunks, least recently used out first.
final class ChunkCache: @unchecked Sendable {
  private let lock = NSLock()
  private var entries: [ChunkID: (bytes: [UInt8], tick: UInt64)] = [:]
  private var size = 0
  private var tick: UInt64 = 0
  let budget: Int

  init(budget: Int) { self.budget = budget }

  func get(_ id: ChunkID) -> [UInt8]? {
    lock.locked {
      guard let e = entries[id] else { return nil }
      tick += 1
      entries[id] = (e.bytes, tick)
      return e.bytes
    }
  }

  func put(_ id: ChunkID, _ bytes: [UInt8]) {
    guard bytes.count <= budget else { return }
    lock.locked {
      tick += 1
      if entries.updateValue((bytes, tick), forKey: id) == nil { size += bytes.count }
      if size > budget {
        // Evict the oldest quarter at once so eviction cost amortises over many puts.
        let sorted = entries.sorted { $0.value.tick < $1.value.tick }
        for (k, v) in sorted.prefix(max(1, sorted.count / 4)) {
          entries[k] = nil
          size -= v.bytes.count
        }
      }
    }
  }

  var bytes: Int { lock.locked { size } }
}
