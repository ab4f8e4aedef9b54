import ChunkStore
import Foundation
import Logging
import NodeControl
import NixFormats
import Synchronization
#if canImport(Glibc)
  import Glibc
#endif

// Views: one per published volume, listing only its closure (for the CSI node service).
extension StoreFileSystem {
  /// Adds a view, or updates it in place: a view keeps its number, hence its inodes, so pods
  /// bound to it keep working when the CSI plugin publishes it again (retries, restarts).
  public func addView(_ view: StoreView) {
    viewTable.withLock { s in
      let number: UInt32
      if let old = s.views[view.id] {
        number = old.number
      } else {
        number = s.nextView
        s.nextView += 1
      }
      s.views[view.id] = RegisteredView(view: view, number: number, members: Set(view.closure))
      s.viewNumbers[number] = view.id
      journal?.view(number, view)
    }
  }

  public func removeView(id: String) {
    let removed = viewTable.withLock { s -> RegisteredView? in
      guard let old = s.views.removeValue(forKey: id) else { return nil }
      s.viewNumbers[old.number] = nil
      journal?.viewRemoved(old.number)
      return old
    }
    guard let old = removed else { return }
    // Its tree instances go too: a view's number is never reused, so nothing can refer to them.
    inodeTable.withLock { s in
      for (key, instance) in s.instanceIDs where key.namespace == old.number {
        s.instanceIDs[key] = nil
        s.instances[instance] = nil
      }
    }
  }

  public func viewIDs() -> [String] { viewTable.withLock { Array($0.views.keys).sorted() } }

  /// Store paths being fetched now.
  public func fetchesInFlight() -> [StorePath] { fetchTable.withLock { Array($0.inflight.keys).sorted() } }
}
