import CFuse3
import ChunkStore
import Foundation
import StoreFS
import Logging
import NixFormats
import NodeControl
import Synchronization

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
    ops.release = { req, _, fi in
      guard let req else { return }
      fs(req).release(handle: fi?.pointee.fh ?? 0)
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


/// The filesystem mounted: one FUSE session at a time, and the takeover of its connection.
public final class FuseMount: @unchecked Sendable {
  public let filesystem: StoreFileSystem
  /// Set and cleared by the serving thread; read by `handOver` from the control socket's.
  var session: FuseSession?
  let gate = HandoverGate()

  public init(_ filesystem: StoreFileSystem) { self.filesystem = filesystem }

  var options: StoreFSOptions { filesystem.options }
  var logger: Logger { filesystem.logger }

  /// The session options: read-only, nosuid, nodev (the store is immutable and never setuid).
  var sessionOptions: [String] {
    var opts = ["ro", "nosuid", "nodev", "fsname=nixfs", "subtype=nixfs", "default_permissions"]
    if getuid() == 0 { opts.append("allow_other") }
    return opts
  }

  /// Mounts at `mountpoint` (or serves the connection `source` hands over) until unmounted from
  /// outside, a signal arrives, or a successor takes the connection over. Blocks the calling
  /// thread. `stateDir` holds the kernel-view journal. With `keepMountOnSignal` (a keeper holds
  /// the connection) a signal stops serving without unmounting, so the next daemon picks it up.
  /// `onServing` runs once the connection is served, with its descriptor and a function that gives
  /// its handover record once there is one (a new mount has one when the kernel's INIT arrived).
  public func serve(
    at mountpoint: String, source: MountSource = .fresh, stateDir: String, keepMountOnSignal: Bool = false,
    onServing: @escaping @Sendable (_ record: @escaping @Sendable () -> Handover?, Int32) -> Void = { _, _ in }
  ) throws -> ServeOutcome {
    let s: FuseSession
    let connection: String
    switch source {
    case .fresh:
      try Mountpoint.prepare(mountpoint, allowNonEmpty: options.allowNonEmpty, logger: logger)
      connection = UUID().uuidString.lowercased()
      filesystem.journal = try KernelViewJournal.create(stateDir: stateDir, connection: connection)
      s = try FuseSession(
        mountpoint: mountpoint, options: sessionOptions, operations: StoreFileSystem.operations,
        userdata: Unmanaged.passUnretained(filesystem).toOpaque())
      logger.info("mounted", metadata: ["mountpoint": "\(mountpoint)", "connection": "\(connection)"])
    case .adopted(let handover, let fd):
      connection = handover.connection
      var view = KernelViewState()
      do {
        view = try KernelViewJournal.load(stateDir: stateDir, connection: connection, storeDir: options.storeDir)
      } catch {
        // Serve anyway: nodes the kernel knows from before answer ESTALE, new lookups work.
        logger.error("cannot replay the kernel view", metadata: ["error": "\(error)"])
      }
      view.generation += 1
      filesystem.restore(view)
      filesystem.journal = try KernelViewJournal.create(stateDir: stateDir, connection: connection, state: view)
      s = try FuseSession(
        adopting: fd, initRequest: [UInt8](handover.initRequest), mountpoint: mountpoint, options: sessionOptions,
        operations: StoreFileSystem.operations, userdata: Unmanaged.passUnretained(filesystem).toOpaque())
      if let why = s.resendUnanswered() {
        logger.warning(
          "the kernel cannot resend requests the previous daemon left unanswered (needs Linux 6.9+); they stay blocked",
          metadata: ["error": "\(why)"])
      }
      logger.info(
        "took over the FUSE connection",
        metadata: [
          "mountpoint": "\(mountpoint)", "connection": "\(connection)", "from_version": "\(handover.version)",
          "generation": "\(view.generation)", "inodes": "\(view.files.count + view.instances.count)",
        ])
    }
    session = s
    defer { session = nil }
    let detaching = Atomic<Bool>(false)
    TerminationSignals.onTermination { [logger] in
      if keepMountOnSignal {
        logger.info("stopping without unmounting: the keeper holds the connection for the next daemon")
        detaching.store(true, ordering: .sequentiallyConsistent)
        s.stop()
      } else {
        s.exit()
        s.unmount()
      }
    }
    onServing({ [self] in s.initRequest.isEmpty ? nil : handover(of: s, connection: connection) }, s.fd)
    while true {
      let rc = s.run(maxThreads: options.maxThreads)
      let ended = gate.loopEnded()
      if ended.again {
        logger.warning("the takeover failed: serving on")
        s.resume()
        continue
      }
      if ended.handedOver {
        s.relinquish()
        logger.info("handed the FUSE connection over", metadata: ["mountpoint": "\(mountpoint)"])
        return .handedOver
      }
      if detaching.load(ordering: .sequentiallyConsistent) {
        s.mute()
        s.relinquish()
        return .detached
      }
      s.unmount()
      logger.info("unmounted", metadata: ["mountpoint": "\(mountpoint)", "status": "\(rc)"])
      return .unmounted
    }
  }

  func handover(of s: FuseSession, connection: String) -> Handover {
    Handover(version: NixFSVersion.string, connection: connection, initRequest: Data(s.initRequest), mountpoint: s.mountpoint)
  }

  /// For a successor: stops reading requests, waits for the workers to finish theirs, mutes the
  /// rest, and returns the connection's record and descriptor. Then `finishHandover` says whether
  /// the successor got them (else this daemon serves on).
  public func handOver(timeout: Double = 10) -> (Handover, Int32)? {
    guard let s = session, let journal = filesystem.journal else { return nil }
    guard gate.stop(timeout: timeout, { s.stop() }) else {
      s.resume()
      return nil
    }
    s.mute()
    return (handover(of: s, connection: journal.connection), s.fd)
  }

  public func finishHandover(succeeded: Bool) { gate.decide(handedOver: succeeded) }

}
