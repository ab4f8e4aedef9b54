import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization
#if canImport(Glibc)
  import Glibc
#endif

// Replies that keep the kernel-lookup counts and the negative cache right.
extension StoreFileSystem {
  package func replyEntry(_ req: any Replier, ino: UInt64, attr: stat, timeout: Double? = nil) {
    if ino != Inode.root && Inode.decode(ino) != .invalid {
      if case .virtual = Inode.decode(ino) {} else {
        inodeTable.withLock { $0.lookups[ino, default: 0] += 1 }
      }
    }
    if !req.entry(ino: ino, attr: attr, timeout: timeout ?? options.entryTimeout) {
      // The kernel did not take the reference (interrupted): undo the count.
      forget(ino, 1)
    }
  }

  /// "No such entry", cached by the kernel for the negative timeout.
  package func replyNegative(_ req: any Replier) {
    req.entry(ino: 0, attr: stat(), timeout: options.negativeTimeout)
  }

  package func replyError(_ req: any Replier, _ errno: Int32, cause: String) {
    metrics.error(cause)
    req.error(errno)
  }

  package func replyAttr(_ req: any Replier, _ st: stat) {
    req.attributes(st, timeout: options.entryTimeout)
  }

  package func forget(_ ino: UInt64, _ n: UInt64) {
    inodeTable.withLock { s in
      guard let c = s.lookups[ino] else { return }
      if c <= n {
        s.lookups[ino] = nil
        if case .file(let content, _) = Inode.decode(ino) {
          // The other executable-bit twin may still be known to the kernel.
          if s.lookups[ino ^ 1] == nil { s.files[content] = nil }
        }
      } else {
        s.lookups[ino] = c - n
      }
    }
  }

  public var knownInodes: Int { inodeTable.withLock { $0.lookups.count } }
}
