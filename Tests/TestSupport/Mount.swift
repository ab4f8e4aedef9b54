import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A running `nixfs mount`, unmounted and stopped when released (even when the test failed).
public final class MountedStore: @unchecked Sendable {
  public let mountpoint: String
  public let stateDir: String
  public let daemon: BackgroundProcess

  /// Starts the daemon and waits until the mount is up.
  public init(mountpoint: String, stateDir: String, arguments: [String]) throws {
    self.mountpoint = mountpoint
    self.stateDir = stateDir
    try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
    daemon = try BackgroundProcess([nixfsBinary, "mount", "--state-dir", stateDir] + arguments + [mountpoint])
    // 120 s, judged after looking: the test process may stand still for half a minute while
    // other tests hold its threads, and a daemon's start (it fsyncs its store and journal) may
    // wait as long behind a writeback storm of the other tests' gigabytes; a mount that came up
    // meanwhile is up.
    let deadline = Date().addingTimeInterval(120)
    while true {
      let late = Date() > deadline
      if isFuseMount(mountpoint) { break }
      if !daemon.isRunning || late {
        let err = daemon.stderr
        daemon.stop()
        throw CommandError(argv: daemon.argv, status: daemon.process.isRunning ? -1 : daemon.process.terminationStatus, stderr: err)
      }
      usleep(20_000)
    }
  }

  public func path(_ relative: String) -> String { "\(mountpoint)/\(relative)" }

  /// Stops the daemon the way an operator would (SIGTERM) and waits for the mount to go.
  public func stop() {
    daemon.stop()
    if isFuseMount(mountpoint) {
      _ = try? run(["fusermount3", "-u", "-z", mountpoint], check: false)
    }
  }

  deinit { stop() }
}

/// A `nixfs keeper` for the mount at `tmp/mnt`, and the daemons that serve that mount in turn
/// (a takeover, a crash and the next daemon): all stopped, and the mount gone, when released.
public final class KeptMount: @unchecked Sendable {
  public let keeper: BackgroundProcess
  public let socket: String
  public let mountpoint: String
  public var daemons: [BackgroundProcess] = []

  public init(in tmp: TemporaryDirectory) throws {
    socket = tmp.sub("keeper.sock")
    mountpoint = tmp.sub("mnt")
    keeper = try BackgroundProcess([nixfsBinary, "keeper", "--socket", socket])
    while !FileManager.default.fileExists(atPath: socket) && keeper.isRunning { usleep(10_000) }
  }

  deinit {
    for d in daemons.reversed() { d.stop() }
    _ = try? run(["fusermount3", "-u", "-z", mountpoint], check: false)
    keeper.stop()
  }
}
