import CFuse3
import Foundation
import Logging

#if canImport(Glibc)
  import Glibc
#endif

/// Errors of mounting and running a FUSE session, with the mountpoint they concern.
public struct MountError: Error, CustomStringConvertible {
  public let mountpoint: String
  public let reason: String
  public var description: String { "cannot mount \(mountpoint): \(reason)" }
}

/// A low-level libfuse session: mounted on init, serves on `run()` until unmounted or signalled.
final class FuseSession: @unchecked Sendable {
  let session: OpaquePointer
  let mountpoint: String
  private var mounted = false

  /// `options` are `-o` mount options (e.g. `ro,nosuid,nodev`); `userdata` is handed to callbacks.
  init(mountpoint: String, options: [String], operations: fuse_lowlevel_ops, userdata: UnsafeMutableRawPointer) throws {
    self.mountpoint = mountpoint
    var argv = ["nixfs"]
    for o in options { argv += ["-o", o] }
    var cArgs = argv.map { strdup($0) }
    defer { cArgs.forEach { free($0) } }
    var args = nixfs_fuse_args_init(Int32(cArgs.count), nil)
    var ops = operations
    let created: OpaquePointer? = cArgs.withUnsafeMutableBufferPointer { buf in
      args.argv = buf.baseAddress
      let s = nixfs_fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata)
      return s
    }
    guard let created else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_new failed (bad options \(options))")
    }
    session = created
    // No destroy here: deinit runs for a throwing init once every property is set, and destroys.
    guard fuse_session_mount(session, mountpoint) == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_mount failed: is /dev/fuse available, and are you root?")
    }
    mounted = true
    // Parallel lookups and readdirs (see the shim: libfuse 3.14 never tells the kernel).
    guard nixfs_fuse_session_parallel_dirops(session, 1) == 0 else {
      throw MountError(mountpoint: mountpoint, reason: "fuse_session_custom_io failed")
    }
  }

  /// On SIGINT/SIGTERM/SIGHUP, unmounts: the kernel then ends every worker's read and `run()`
  /// returns. (libfuse's own handlers only set a flag that a thread parked in the multithreaded
  /// loop may never look at, and they skip signals a parent left ignored.)
  func handleSignals() {
    TerminationSignals.onTermination { [self] in
      exit()
      unmount()
    }
  }

  /// Serves requests on up to `maxThreads` threads; returns when unmounted or told to exit.
  func run(maxThreads: Int) -> Int32 {
    nixfs_fuse_session_loop_mt(session, UInt32(maxThreads), 0)
  }

  func exit() { fuse_session_exit(session) }

  private let unmountLock = NSLock()

  /// Idempotent; safe from the signal watcher and the serving thread at once.
  func unmount() {
    unmountLock.lock()
    defer { unmountLock.unlock() }
    guard mounted else { return }
    mounted = false
    fuse_session_unmount(session)
  }

  deinit {
    unmount()
    fuse_session_destroy(session)
  }
}
