#if canImport(Glibc)
  import Glibc
#endif

/// How the filesystem core answers one kernel request. Exactly one method is called, once, from
/// whichever thread finishes the request (a FUSE worker, or a task after a fetch). The FUSE
/// adapter turns it into `fuse_reply_*`; tests record it.
package protocol Replier: Sendable {
  /// A name resolved (`ino` non-zero) or known to be missing (`ino` 0), for the kernel to cache
  /// for `timeout` seconds. False when the kernel did not take it (the request was interrupted).
  @discardableResult func entry(ino: UInt64, attr: stat, timeout: Double) -> Bool
  func attributes(_ attr: stat, timeout: Double)
  func error(_ errno: Int32)
  func bytes(_ data: UnsafeRawBufferPointer)
  func symlink(_ target: [UInt8])
  /// An open file or directory: its handle, and whether the kernel may keep its pages
  /// (`keepCache`) and its listing (`cacheDirectory`) across opens.
  func opened(handle: UInt64, keepCache: Bool, cacheDirectory: Bool)
  /// An open file the kernel reads from the registered backing file `backingID` (passthrough).
  func openedPassthrough(handle: UInt64, backingID: Int32)
  /// A directory's entries from `offset` on (0 and 1 are "." and ".."), at most `size` bytes of them.
  func listing(_ entries: [DirectoryEntry], directory: UInt64, offset: Int, size: Int)
  /// READDIRPLUS: entries from `offset` with their attributes, at most `size` bytes of them. An
  /// entry with `ino` 0 is listed without an attribute (the kernel makes no dentry of it).
  /// `accepted` runs with the indexes that fit, before the reply is sent: each is a lookup the
  /// kernel will forget.
  func listingPlus(
    _ entries: [PlusEntry], directory: UInt64, offset: Int, size: Int, timeout: Double, accepted: (Range<Int>) -> Void)
  func filesystem(_ vfs: statvfs)
}

/// One entry of a READDIRPLUS answer: its name, node id (0: none) and attributes.
package struct PlusEntry {
  package let name: [UInt8]
  package let ino: UInt64
  package let attr: stat
}
