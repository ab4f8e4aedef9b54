import CFuse3
import Foundation
import StoreFS
import Logging
import NixFormats
import NodeControl
import Synchronization
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

// The FUSE adapter: the one place that speaks libfuse. Its callbacks hand each request to the
// filesystem core with a `FuseReply`, which answers it with `fuse_reply_*`; mounting, serving and
// handing the connection over are here too. The core (StoreFileSystem, Operations) never sees
// a libfuse type, so tests drive it in process with a recording replier.

/// One kernel request, answered exactly once, from whichever thread finishes it.
struct FuseReply: Replier, @unchecked Sendable {
  let raw: fuse_req_t
  /// For open and opendir: a copy of libfuse's `fuse_file_info`, which lives on libfuse's stack
  /// while the answer may come later, from a task. Freed by the answer.
  let file: UnsafeMutablePointer<fuse_file_info>?

  init(_ raw: fuse_req_t, file: UnsafeMutablePointer<fuse_file_info>? = nil) {
    self.raw = raw
    if let file {
      let copy = UnsafeMutablePointer<fuse_file_info>.allocate(capacity: 1)
      copy.initialize(to: file.pointee)
      self.file = copy
    } else {
      self.file = nil
    }
  }

  private func done() { file?.deallocate() }

  func entry(ino: UInt64, attr: stat, timeout: Double) -> Bool {
    var e = fuse_entry_param()
    e.ino = ino
    e.attr = attr
    e.attr_timeout = ino == 0 ? 0 : timeout
    e.entry_timeout = timeout
    defer { done() }
    return fuse_reply_entry(raw, &e) == 0
  }

  func attributes(_ attr: stat, timeout: Double) {
    var st = attr
    _ = fuse_reply_attr(raw, &st, timeout)
    done()
  }

  func error(_ errno: Int32) {
    _ = fuse_reply_err(raw, errno)
    done()
  }

  func bytes(_ data: UnsafeRawBufferPointer) {
    _ = fuse_reply_buf(raw, data.baseAddress?.assumingMemoryBound(to: CChar.self), data.count)
    done()
  }

  func symlink(_ target: [UInt8]) {
    _ = (target + [0]).withUnsafeBufferPointer { buf in
      buf.withMemoryRebound(to: CChar.self) { fuse_reply_readlink(raw, $0.baseAddress) }
    }
    done()
  }

  func opened(handle: UInt64, keepCache: Bool, cacheDirectory: Bool) {
    guard let file else { return error(EIO) }
    file.pointee.fh = handle
    nixfs_fuse_fi_set_cache(file, keepCache ? 1 : 0, cacheDirectory ? 1 : 0)
    _ = fuse_reply_open(raw, file)
    done()
  }

  func openedPassthrough(handle: UInt64, backingID: Int32) {
    _ = nixfs_fuse_reply_open_passthrough(raw, handle, backingID)
    done()
  }

  /// Packs entries from `offset` (0 and 1 are "." and "..") into at most `size` bytes.
  func listing(_ entries: [DirectoryEntry], directory: UInt64, offset: Int, size: Int) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 16)
    defer { buffer.deallocate() }
    var used = 0
    var index = offset
    let total = entries.count + 2
    while index < total {
      let name: [UInt8]
      var st = stat()
      switch index {
      case 0:
        name = Array(".".utf8)
        st.st_ino = UInt(directory)
        st.st_mode = S_IFDIR
      case 1:
        name = Array("..".utf8)
        st.st_ino = UInt(Inode.root)
        st.st_mode = S_IFDIR
      default:
        let e = entries[index - 2]
        name = e.name
        st.st_ino = UInt(e.ino)
        st.st_mode = e.mode
      }
      let needed = (name + [0]).withUnsafeBufferPointer { n in
        n.withMemoryRebound(to: CChar.self) { cname in
          fuse_add_direntry(
            raw, buffer.baseAddress!.advanced(by: used).assumingMemoryBound(to: CChar.self), size - used,
            cname.baseAddress, &st, off_t(index + 1))
        }
      }
      if needed > size - used { break }
      used += needed
      index += 1
    }
    _ = fuse_reply_buf(raw, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), used)
    done()
  }

  func listingPlus(
    _ entries: [PlusEntry], directory: UInt64, offset: Int, size: Int, timeout: Double, accepted: (Range<Int>) -> Void
  ) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 16)
    defer { buffer.deallocate() }
    var used = 0
    var packed = 0
    for (k, e) in entries.enumerated() {
      var param = fuse_entry_param()
      param.ino = e.ino
      param.attr = e.attr
      param.attr_timeout = e.ino == 0 ? 0 : timeout
      param.entry_timeout = e.ino == 0 ? 0 : timeout
      let needed = (e.name + [0]).withUnsafeBufferPointer { n in
        n.withMemoryRebound(to: CChar.self) { cname in
          fuse_add_direntry_plus(
            raw, buffer.baseAddress!.advanced(by: used).assumingMemoryBound(to: CChar.self), size - used,
            cname.baseAddress, &param, off_t(offset + k + 1))
        }
      }
      if needed > size - used { break }
      used += needed
      packed += 1
    }
    accepted(0..<packed)
    _ = fuse_reply_buf(raw, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), used)
    done()
  }

  func filesystem(_ vfs: statvfs) {
    var v = vfs
    _ = fuse_reply_statfs(raw, &v)
    done()
  }
}

/// The libfuse low-level callbacks. Each resolves its `StoreFileSystem` from the request's
/// userdata and returns quickly: anything that needs the network replies later from a task.
extension StoreFileSystem {
  static func fs(_ req: fuse_req_t?) -> StoreFileSystem {
    Unmanaged<StoreFileSystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
  }

  static let operations: fuse_lowlevel_ops = {
    var ops = fuse_lowlevel_ops()
    ops.`init` = { userdata, conn in
      guard let conn else { return }
      // Large requests, symlink caching, and kernel-side parallel lookups.
      conn.pointee.max_write = 1 << 20
      conn.pointee.max_readahead = 1 << 20
      for cap in [FUSE_CAP_CACHE_SYMLINKS, FUSE_CAP_PARALLEL_DIROPS, FUSE_CAP_ASYNC_READ] {
        if conn.pointee.capable & UInt32(cap) != 0 { conn.pointee.want |= UInt32(cap) }
      }
      // The store never changes under a path: never drop cached pages on attribute refresh.
      conn.pointee.want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
    }
    ops.lookup = { req, parent, name in
      guard let req, let name else { return }
      fs(req).lookup(FuseReply(req), parent: parent, name: UnsafeRawBufferPointer(start: name, count: strlen(name)))
    }
    ops.forget = { req, ino, n in
      fs(req).forget(ino, n)
      fuse_reply_none(req)
    }
    ops.forget_multi = { req, count, forgets in
      let fs = fs(req)
      if let forgets {
        for i in 0..<count { fs.forget(forgets[i].ino, forgets[i].nlookup) }
      }
      fuse_reply_none(req)
    }
    ops.getattr = { req, ino, _ in
      guard let req else { return }
      fs(req).getattr(FuseReply(req), ino: ino)
    }
    ops.readlink = { req, ino in
      guard let req else { return }
      fs(req).readlink(FuseReply(req), ino: ino)
    }
    ops.open = { req, ino, fi in
      guard let req, let fi else { return }
      fs(req).open(FuseReply(req, file: fi), ino: ino, flags: fi.pointee.flags)
    }
    ops.read = { req, ino, size, offset, _ in
      guard let req else { return }
      fs(req).read(FuseReply(req), ino: ino, size: size, offset: offset)
    }
    ops.release = { req, ino, fi in
      guard let req else { return }
      fs(req).release(handle: fi?.pointee.fh ?? 0, ino: ino)
      _ = fuse_reply_err(req, 0)
    }
    ops.opendir = { req, ino, fi in
      guard let req, let fi else { return }
      fs(req).opendir(FuseReply(req, file: fi), ino: ino)
    }
    ops.readdir = { req, ino, size, offset, fi in
      guard let req else { return }
      fs(req).readdir(FuseReply(req), ino: ino, size: size, offset: offset, handle: fi?.pointee.fh ?? 0)
    }
    ops.readdirplus = { req, ino, size, offset, fi in
      guard let req else { return }
      fs(req).readdirplus(FuseReply(req), ino: ino, size: size, offset: offset, handle: fi?.pointee.fh ?? 0)
    }
    ops.releasedir = { req, _, fi in
      guard let req else { return }
      fs(req).releaseDirectory(handle: fi?.pointee.fh ?? 0)
      _ = fuse_reply_err(req, 0)
    }
    ops.statfs = { req, _ in
      guard let req else { return }
      fs(req).statfs(FuseReply(req))
    }
    return ops
  }()
}

/// Backing files registered on the connection's /dev/fuse descriptor (FUSE passthrough).
struct FuseBackingRegistrar: BackingRegistrar {
  let device: Int32
  func register(_ fd: Int32) -> Result<Int32, SystemCallError> {
    let r = nixfs_fuse_backing_open(device, fd)
    return r > 0 ? .success(r) : .failure(SystemCallError(call: "ioctl FUSE_DEV_IOC_BACKING_OPEN", errno: -r))
  }
  func unregister(_ id: Int32) { _ = nixfs_fuse_backing_close(device, id) }
}
