import Foundation
import StoreFS
import NodeControl
import Threads

#if canImport(Glibc)
  import Glibc
#endif

/// Takeover: a new `nixfs mount` on the same state directory and mountpoint takes the FUSE
/// connection from the running daemon instead of failing, so pods never see the mount go away.
///
/// The successor prepares everything that can fail (flags, nix.conf, caches) and then offers a
/// takeover on the control socket. The running daemon stops reading requests (the kernel queues
/// them), lets the workers finish what they are in, mutes its replies, and answers with this
/// record and the /dev/fuse descriptor (SCM_RIGHTS); then it exits, releasing the store's lock.
/// The successor opens the store, replays the kernel-view journal (what the node ids mean) and
/// the kernel's INIT request (libfuse needs one to start), asks the kernel to resend what the old
/// daemon read but never answered (FUSE_NOTIFY_RESEND), and serves from the next request on.
/// A keeper (`nixfs keeper`) holds a copy of the same record and descriptor, so a crashed daemon's
/// successor picks the connection up the same way.
/// The connection a daemon serves: one it mounts itself, or one handed to it with its record.
public enum MountSource: Sendable {
  case fresh
  case adopted(Handover, descriptor: Int32)
}

/// How serving ended.
public enum ServeOutcome: Sendable {
  /// Unmounted (a signal, or `fusermount3 -u` from outside).
  case unmounted
  /// Handed to a successor, which now serves the connection.
  case handedOver
  /// Stopped on a signal without unmounting: the keeper holds the connection for a successor.
  case detached
}

/// Coordinates the serving thread and a takeover request from the control socket.
final class HandoverGate: Sendable {
  enum Phase: Equatable {
    case serving, stopping, stopped
    case decided(handedOver: Bool)
  }

  private let phase = Locked(Phase.serving)

  /// Called by the serving thread when the session loop returned. Returns whether to run again
  /// (a handover was attempted and failed), and whether the connection was handed over.
  func loopEnded() -> (again: Bool, handedOver: Bool) {
    let stopped = phase.withLock { p -> Bool in
      guard p == .stopping else { return false }
      p = .stopped
      return true
    }
    guard stopped else { return (false, false) }
    phase.broadcast()
    return phase.withLock(when: { $0 != .stopped }) { p in
      guard case .decided(let handedOver) = p else { return (false, false) }
      p = .serving
      return (!handedOver, handedOver)
    }
  }

  /// Stops the loop through `stop` and waits until it has ended; false if it did not within `timeout`.
  func stop(timeout: Double, _ stop: () -> Void) -> Bool {
    let began = phase.withLock { p -> Bool in
      guard p == .serving else { return false }
      p = .stopping
      return true
    }
    guard began else { return false }
    stop()
    return phase.withLock(when: { $0 != .stopping }, timeout: timeout) { p, ended in
      // Not stopped in time: serve on (the caller resumes the session).
      if !ended { p = .serving }
      return ended
    }
  }

  func decide(handedOver: Bool) {
    phase.withLock { $0 = .decided(handedOver: handedOver) }
    phase.broadcast()
  }
}
