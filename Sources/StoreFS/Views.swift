import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization
import SystemCalls
#if canImport(Glibc)
  import Glibc
#endif

// Views: one per published volume, listing only its closure (for the CSI node service).
extension StoreFileSystem {
  /// Adds a view, or updates it in place: a view keeps its number, hence its inodes, so pods
  /// bound to it keep working when the CSI plugin publishes it again (retries, restarts).
  public func addView(_ view: StoreView) {
    let number = viewTable.withLock { s -> UInt32 in
      let number: UInt32
      if let old = s.views[view.id] {
        number = old.number
      } else {
        number = s.nextView
        s.nextView += 1
      }
      s.views[view.id] = RegisteredView(view: view, number: number, members: Set(view.closure))
      s.viewNumbers[number] = view.id
      return number
    }
    // Outside the table's lock (no lock is taken while another is held); the CSI plugin publishes
    // and unpublishes one at a time, so the records keep their order.
    if let e = journal?.view(number, view) { journalFailed(e, "view \(view.id)") }
  }

  /// A record the successor will lack: its entries for that number answer ESTALE there.
  package func journalFailed(_ error: SystemCallError, _ what: String) {
    logger.error(
      "cannot journal a kernel node id; after a takeover the kernel's entries for it go stale",
      metadata: ["what": "\(what)", "journal": "\(journal?.path ?? "")", "error": "\(error)"])
  }

  public func removeView(id: String) {
    let removed = viewTable.withLock { s -> RegisteredView? in
      guard let old = s.views.removeValue(forKey: id) else { return nil }
      s.viewNumbers[old.number] = nil
      return old
    }
    guard let old = removed else { return }
    if let e = journal?.viewRemoved(old.number) { journalFailed(e, "removal of view \(id)") }
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
  public func fetchesInFlight() -> [StorePath] { fetches.keys.sorted() }
}
