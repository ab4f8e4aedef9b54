import Foundation

#if canImport(Glibc)
  import Glibc
#endif

extension ChunkStore {
  func packPath(_ id: Int64) -> String {
    packDirectory + "/" + String(repeating: "0", count: max(0, 8 - String(id).count)) + String(id) + ".pack"
  }

  /// A cached descriptor of a pack, opened for reading and (unless read-only) writing.
  func packFD(_ id: Int64) throws(ChunkStoreError) -> Int32 {
    try bookkeeping.withLock { (b) throws(ChunkStoreError) -> Int32 in
      if let fd = b.packFDs[id] { return fd }
      let path = packPath(id)
      let fd = open(path, (configuration.readOnly ? O_RDONLY : O_RDWR | O_CREAT) | O_CLOEXEC, 0o600)
      guard fd >= 0 else { throw .io(path: path, operation: "open", errno: errno) }
      b.packFDs[id] = fd
      return fd
    }
  }

  func closePack(_ id: Int64) {
    bookkeeping.withLock {
      if let fd = $0.packFDs.removeValue(forKey: id) { close(fd) }
    }
  }

  struct PackLease {
    let id: Int64
    let fd: Int32
    let start: UInt64
  }

  func leasePack() throws(ChunkStoreError) -> PackLease {
    let id: Int64
    if let idle = bookkeeping.withLock({ $0.idlePacks.popLast() }) {
      id = idle
    } else {
      do {
        id = try withWriter { db in try db.insertPack() }
      } catch let e as ChunkStoreError { throw e } catch { throw .index(path: indexPath, operation: "new pack", message: "\(error)") }
      _ = try packFD(id)
      // The pack's directory entry must be durable before any chunk in it is committed.
      fsyncDirectory(packDirectory)
    }
    bookkeeping.withLock { _ = $0.leasedPacks.insert(id) }
    let fd = try packFD(id)
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw .io(path: packPath(id), operation: "stat", errno: errno) }
    return PackLease(id: id, fd: fd, start: UInt64(st.st_size))
  }

  func returnPack(_ lease: PackLease, end: UInt64) {
    bookkeeping.withLock {
      $0.leasedPacks.remove(lease.id)
      if end < configuration.packLimit { $0.idlePacks.append(lease.id) }
    }
  }

  /// Forgets a pack GC emptied, unless an ingest is appending to it. Returns true if forgotten.
  func retirePack(_ id: Int64) -> Bool {
    let ok = bookkeeping.withLock { b -> Bool in
      if b.leasedPacks.contains(id) { return false }
      b.idlePacks.removeAll { $0 == id }
      return true
    }
    if ok { closePack(id) }
    return ok
  }

  /// Deletes packs that hold no live chunk and that no ingest is appending to.
  func retireEmptyPacks() throws(ChunkStoreError) {
    let empty: [Int64] = try wrap("empty packs") {
      try withWriter { db in try db.emptyPacks() }
    }
    for id in empty where retirePack(id) {
      try wrap("retire pack") { try withWriter { db in try db.deletePack(id) } }
      unlink(packPath(id))
    }
  }
}
