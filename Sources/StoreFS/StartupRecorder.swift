import ChunkStore
import Foundation
import NixFormats
import Synchronization
/// Chunks pods fetch in their first seconds, per publish: what a startup profile is made of.
package final class StartupRecorder: Sendable {
  package struct Window {
    let root: StorePath
    let members: Set<StorePath>
    var chunks: [ChunkRef] = []
    var seen: Set<ChunkID> = []
  }
  private let state = Mutex<(next: Int, open: [Int: Window])>((0, [:]))
  /// Chunks one window records at most (a profile holds no more: `StartupProfile.limit`).
  package static let limit = 65_536

  package func open(root: StorePath, members: Set<StorePath>) -> Int {
    state.withLock { s in
      s.next += 1
      s.open[s.next] = Window(root: root, members: members)
      return s.next
    }
  }

  /// Chunks a read of a file of `path` had to fetch.
  package func record(_ path: StorePath, _ refs: [ChunkRef]) {
    state.withLock { s in
      for (id, var w) in s.open where w.members.contains(path) && w.chunks.count < Self.limit {
        for r in refs where w.seen.insert(r.id).inserted { w.chunks.append(r) }
        s.open[id] = w
      }
    }
  }

  package func close(_ id: Int) -> [ChunkRef] { state.withLock { $0.open.removeValue(forKey: id)?.chunks ?? [] } }
}


extension Duration {
  package var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
