import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A request the daemon had read but not answered when it went away (a lookup waiting for its
/// NAR) is answered by the next daemon: the kernel resends it (FUSE_NOTIFY_RESEND).
@Suite(.serialized) struct InFlightTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  enum Switch: String, CaseIterable { case takeover, crash }

  @Test(arguments: Switch.allCases)
  func aLookupInFlightCompletesAcrossTheSwitch(_ how: Switch) throws {
    let tmp = try TemporaryDirectory("inflight")
    // The 6 MiB path takes seconds to arrive: its lookup is in flight when the daemon goes.
    let server = try CacheServer(directory: fx.caches["none"]!, bandwidth: 2_000_000)
    let kept = try KeptMount(in: tmp)
    let argv =
      [nixfsBinary, "mount", "--state-dir", tmp.sub("state"), "--keeper", kept.socket]
      + fx.mountArguments(server) + [kept.mountpoint]
    let first = try MountedStore(
      mountpoint: kept.mountpoint, stateDir: tmp.sub("state"), arguments: ["--keeper", kept.socket] + fx.mountArguments(server))
    kept.daemons.append(first.daemon)
    let kinds = fx.paths["kinds"]!
    let reader = try BackgroundProcess(["cat", first.path("\(kinds.baseName)/hello.txt")])
    // Until the download is under way (the server started sending the NAR; it takes 3 s).
    let deadline = Date().addingTimeInterval(30)
    while !server.started.contains(where: { $0.hasPrefix("/nar/") }) && Date() < deadline { usleep(10_000) }
    #expect(reader.isRunning, "the lookup should still wait for its NAR")
    if how == .crash { first.daemon.signal(SIGKILL) }
    let next = try BackgroundProcess(argv)
    kept.daemons.append(next)
    #expect(first.daemon.wait(seconds: 30))
    let completed = reader.wait(seconds: 60)
    #expect(completed, "the lookup never completed: \(next.stderr)")
    guard completed else { return }
    #expect(reader.readLine() == "hello, world", "\(reader.stderr) / \(next.stderr)")
    #expect(reader.process.terminationStatus == 0, "\(reader.stderr)")
    #expect(next.isRunning, "\(next.stderr)")
  }
}
