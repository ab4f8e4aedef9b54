import CFuse3
import Foundation
import Synchronization
import StoreFS
import Logging
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

/// Errors of mounting and running a FUSE session, with the mountpoint they concern.
public struct MountError: Error, CustomStringConvertible {
  public let mountpoint: String
  public let reason: String
  public var description: String { "cannot mount \(mountpoint): \(reason)" }
}

/// The one state of the shim's /dev/fuse I/O (see CFuse3/shim.h), defined here so that every
/// object file inlining the shim's functions shares it. Zeroed, with no stop eventfd yet.
nonisolated(unsafe) private let fuseIOState: UnsafeMutablePointer<nixfs_fuse_io_state> = {
  let p = UnsafeMutablePointer<nixfs_fuse_io_state>.allocate(capacity: 1)
  UnsafeMutableRawPointer(p).initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<nixfs_fuse_io_state>.size)
  p.pointee.stop_fd = -1
  return p
}()

@_cdecl("nixfs_fuse_io_state")
func nixfsFuseIOState() -> UnsafeMutablePointer<nixfs_fuse_io_state> { fuseIOState }

/// A low-level libfuse session on one FUSE connection: either mounted here, or adopted from the
/// daemon that served it before (takeover, or a crash with a keeper holding the descriptor).
final class FuseSession: @unchecked Sendable {
  let session: OpaquePointer
  let mountpoint: String
  /// The connection's /dev/fuse descriptor (the session owns it and closes it on destroy).
  let fd: Int32
  /// True when the kernel's mount entry came from libfuse in this process (it unmounts it then).
  private let mountedHere: Bool
  /// False once the mount is unmounted or handed to a successor: deinit leaves it alone.
  private let owned = Mutex(true)

  private static func newSession(
    mountpoint: String, options: [String], operations: fuse_lowlevel_ops, userdata: UnsafeMutableRawPointer
  ) throws(MountError) -> OpaquePointer {
    var argv = ["nixfs"]
    for o in options { argv += ["-o", o] }
    var cArgs = argv.map { strdup($0) }
    defer { cArgs.forEach { free($0) } }
    var args = nixfs_fuse_args_init(Int32(cArgs.count), nil)
    var ops = operations
    let created: OpaquePointer? = cArgs.withUnsafeMutableBufferPointer { buf in
      args.argv = buf.baseAddress
      return nixfs_fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata)
    }
    guard let created else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_new failed (bad options \(options))")
    }
    return created
  }

  /// Mounts a new connection at `mountpoint`. `options` are `-o` mount options (`ro,nosuid,nodev`).
  init(mountpoint: String, options: [String], operations: fuse_lowlevel_ops, userdata: UnsafeMutableRawPointer)
    throws(MountError)
  {
    self.mountpoint = mountpoint
    session = try Self.newSession(mountpoint: mountpoint, options: options, operations: operations, userdata: userdata)
    // On a throw from here on, deinit runs (every property is set) and destroys the session.
    guard fuse_session_mount(session, mountpoint) == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_mount failed: is /dev/fuse available, and are you root?")
    }
    fd = fuse_session_fd(session)
    mountedHere = true
    // Our own /dev/fuse I/O: parallel lookups (libfuse 3.14 never tells the kernel), and the
    // stop, mute and INIT capture a takeover needs (see the shim).
    guard nixfs_fuse_session_custom_io(session, fd, 1) == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_custom_io failed")
    }
  }

  /// Serves an existing connection: `fd` is its /dev/fuse descriptor and `initRequest` the INIT
  /// request the kernel sent its first daemon, replayed so libfuse initialises as that one did.
  init(
    adopting fd: Int32, initRequest: [UInt8], mountpoint: String, options: [String], operations: fuse_lowlevel_ops,
    userdata: UnsafeMutableRawPointer
  ) throws(MountError) {
    self.mountpoint = mountpoint
    self.fd = fd
    mountedHere = false
    session = try Self.newSession(mountpoint: mountpoint, options: options, operations: operations, userdata: userdata)
    // On a throw from here on, deinit destroys the session; it must never unmount the live mount.
    owned.withLock { $0 = false }
    guard nixfs_fuse_session_custom_io(session, fd, 1) == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_custom_io failed on the handed-over descriptor")
    }
    let armed = initRequest.withUnsafeBufferPointer { nixfs_fuse_replay_init($0.baseAddress, Int32($0.count)) }
    guard armed == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "the handed-over INIT request is malformed")
    }
    owned.withLock { $0 = true }
  }

  /// The kernel's INIT request for this connection (what a successor replays); empty until the
  /// kernel sent it, just after mounting.
  var initRequest: [UInt8] {
    var buf = [UInt8](repeating: 0, count: 512)
    let n = nixfs_fuse_init_request_copy(&buf, Int32(buf.count))
    return Array(buf[0..<Int(max(n, 0))])
  }

  /// Serves requests on up to `maxThreads` threads; returns when unmounted, told to exit, or stopped.
  func run(maxThreads: Int) -> Int32 {
    nixfs_fuse_session_loop_mt(session, UInt32(maxThreads), 0)
  }

  func exit() { fuse_session_exit(session) }

  /// Ends `run()` without taking another request from the kernel: each worker finishes the
  /// request it is in, and the next read returns. Requests stay queued in the kernel.
  func stop() { nixfs_fuse_stop() }

  /// Undoes `stop()` and `mute()` (a handover that failed): `run()` may be called again.
  func resume() { nixfs_fuse_resume() }

  /// From now on replies are dropped (the successor answers the requests they belonged to).
  func mute() { nixfs_fuse_set_muted(1) }

  /// Asks the kernel to send every request that was read but not answered again (Linux 6.9+).
  /// Returns nil, or why not.
  func resendUnanswered() -> String? {
    let r = nixfs_fuse_notify_resend(fd)
    return r == 0 ? nil : String(cString: strerror(-r))
  }

  /// The connection now belongs to a successor: never unmount it from here.
  func relinquish() { owned.withLock { $0 = false } }

  /// Idempotent; safe from the signal watcher and the serving thread at once. The kernel then
  /// ends every worker's read and `run()` returns.
  func unmount() {
    // Held while unmounting: a relinquish that comes meanwhile waits for it.
    owned.withLock { owned in
      guard owned else { return }
      owned = false
      // Wake the workers waiting in epoll first: libfuse closes its descriptor before unmounting,
      // and a closed descriptor wakes no epoll.
      nixfs_fuse_stop()
      if mountedHere {
        fuse_session_unmount(session)
      } else {
        // libfuse knows no mountpoint for an adopted connection: detach it as libfuse would.
        umount2(mountpoint, Int32(MNT_DETACH))
      }
    }
  }

  deinit {
    unmount()
    fuse_session_destroy(session)
  }
}
