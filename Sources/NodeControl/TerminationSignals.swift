import Foundation
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

/// Write end of the pipe the signal handler wakes the watcher through.
nonisolated(unsafe) private var signalPipe: Int32 = -1

/// SIGTERM/SIGINT/SIGHUP handling that works however the process was started. A parent may leave
/// these ignored or blocked (supervisors, test runners, shells), and dispatch sources and libfuse
/// only see signals left at their defaults; so install a handler explicitly, unblock, and do the
/// work on a watcher thread (the handler itself only writes a byte to a pipe).
public enum TerminationSignals {
  public static func onTermination(_ action: @escaping @Sendable () -> Void) {
    var fds: [Int32] = [0, 0]
    guard pipe(&fds) == 0 else { return }
    signalPipe = fds[1]
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGTERM, SIGINT, SIGHUP] {
      signal(s) { _ in
        var b: UInt8 = 1
        _ = write(signalPipe, &b, 1)
      }
      sigaddset(&set, s)
    }
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
    let readEnd = fds[0]
    let watcher = Thread {
      var b: UInt8 = 0
      _ = try? systemCall("read") { read(readEnd, &b, 1) }
      action()
    }
    watcher.name = "nixfs-signals"
    watcher.start()
  }
}
