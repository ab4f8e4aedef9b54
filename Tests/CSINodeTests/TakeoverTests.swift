import Foundation
import GRPCCore
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A daemon upgrade (takeover) or crash (with a keeper) never breaks a pod: no failed read or
/// exec, no ENOTCONN, no changed inode, every checksum right.
@Suite(.serialized) struct TakeoverTests {
  /// Successor daemons started by a test, stopped in teardown even when it fails.
  final class Daemons: @unchecked Sendable {
    var all: [BackgroundProcess] = []
    deinit { for d in all.reversed() { d.stop() } }
  }

  /// Starts `nixfs mount` with the node's arguments and waits until it serves (its log says it
  /// took the connection over) or exits.
  func successor(_ node: Node, _ daemons: Daemons, environment: [String: String] = [:], mountpoint: String? = nil)
    throws -> BackgroundProcess
  {
    let p = try BackgroundProcess(
      [nixfsBinary, "mount", "--state-dir", node.store.stateDir] + node.mountArguments + [mountpoint ?? node.store.mountpoint],
      environment: environment)
    daemons.all.append(p)
    let deadline = Date().addingTimeInterval(60)
    while p.isRunning && !p.stderr.contains("took over the FUSE connection") && Date() < deadline { usleep(10_000) }
    return p
  }

  @Test func podsNeverNoticeTakeoversOrCrashes() async throws {
    let node = try Node(withKeeper: true)
    let daemons = Daemons()
    defer {
      // Successors first (with a keeper, SIGTERM leaves the mount to it), then the mount, then the keeper.
      for d in daemons.all.reversed() { d.stop() }
      node.store.stop()
      node.keeper?.stop()
    }
    let app = node.fx.paths["app"]!
    let kinds = node.fx.paths["kinds"]!
    let t = node.target("pod-t")
    let k = node.target("pod-k")
    try await node.withClients { _, csi in
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-t", target: t, attributes: ["storePath": app.path]))
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-k", target: k, attributes: ["storePath": kinds.path]))
    }
    let big = "/nix/store/\(kinds.baseName)/big.bin"
    let want = try run(["cksum"], stdin: Array(FileManager.default.contents(atPath: "\(node.fx.trees[kinds]!)/big.bin")!))
      .trimmed
    let inodeBefore = try run(["unshare", "-m", "sh", "-c", "mount --bind '\(k)' /nix && stat -c %i \(big)"]).trimmed
    // The "pod": execs a program of the closure and checksums a large file, again and again;
    // a second reader holds the large file open and reads it slowly, across the switches.
    let stop = node.tmp.sub("stop")
    let kview = node.tmp.sub("kview")
    try FileManager.default.createDirectory(atPath: kview, withIntermediateDirectories: true)
    let script = """
      mount --bind '\(t)' /nix && mount --bind '\(k)/store' '\(kview)' || exit 99
      BIG='\(kview)/\(kinds.baseName)/big.bin'
      slow() {
        s=0; f=0
        while [ ! -e '\(stop)' ]; do
          exec 3< "$BIG" || { f=$((f+1)); continue; }
          sum=$( (for i in 1 2 3 4 5 6 7; do dd bs=1M count=1 iflag=fullblock status=none <&3; sleep 0.05; done) | cksum)
          exec 3<&-
          [ "$sum" = '\(want)' ] || { f=$((f+1)); echo "slow: $sum" >&2; }
          s=$((s+1))
        done
        echo "SLOW $s $f"
      }
      slow &
      n=0; f=0
      while [ ! -e '\(stop)' ]; do
        out=$(/nix/var/result/bin/app 2>&1); [ "$out" = libdata ] || { f=$((f+1)); echo "exec: $out" >&2; }
        sum=$(cksum < "$BIG" 2>&1); [ "$sum" = '\(want)' ] || { f=$((f+1)); echo "read: $sum" >&2; }
        ls /nix/store > /dev/null 2>&1 || { f=$((f+1)); echo "ls failed" >&2; }
        n=$((n+1))
      done
      wait
      echo "FAST $n $f"
      """
    let pod = try BackgroundProcess(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    defer {
      _ = FileManager.default.createFile(atPath: stop, contents: nil)
      _ = pod.wait(seconds: 30)
    }
    usleep(500_000)
    var current = node.store.daemon
    for round in 1...10 {
      let next = try successor(node, daemons)
      #expect(next.isRunning && next.stderr.contains("took over"), "takeover \(round): \(next.stderr)")
      #expect(current.wait(seconds: 30), "takeover \(round): the old daemon did not exit")
      #expect(current.process.terminationStatus == 0, "takeover \(round): \(current.stderr)")
      current = next
      usleep(300_000)
    }
    for round in 1...6 {
      // Five crashes, and one SIGTERM (a container restart): the keeper keeps the connection.
      current.signal(round == 6 ? SIGTERM : SIGKILL)
      #expect(current.wait(seconds: 30))
      usleep(200_000)  // requests queue in the kernel meanwhile
      let next = try successor(node, daemons)
      #expect(next.isRunning && next.stderr.contains("picking up the FUSE connection"), "crash \(round): \(next.stderr)")
      current = next
      usleep(300_000)
    }
    _ = FileManager.default.createFile(atPath: stop, contents: nil)
    #expect(pod.wait(seconds: 60), "the pod's loop did not finish")
    var lines: [String] = []
    while let line = pod.readLine() { lines.append(line) }
    let fast = lines.first { $0.hasPrefix("FAST ") }?.split(separator: " ")
    let slow = lines.first { $0.hasPrefix("SLOW ") }?.split(separator: " ")
    // What the daemons said about errors, to tell a failed read from one that never got an answer.
    let daemonErrors = ([node.store.daemon] + daemons.all).enumerated().flatMap { n, d in
      d.stderr.split(separator: "\n").filter { $0.contains("error") || $0.contains("warning") }.map { "daemon \(n): \($0)" }
    }
    #expect(fast?.count == 3 && fast?[2] == "0", "pod: \(lines) \(pod.stderr) \(daemonErrors)")
    #expect(slow?.count == 3 && slow?[2] == "0", "pod: \(lines) \(pod.stderr) \(daemonErrors)")
    #expect((Int(fast?[1] ?? "0") ?? 0) > 10 && (Int(slow?[1] ?? "0") ?? 0) > 1, "the pod barely ran: \(lines)")
    #expect(!pod.stderr.contains("not connected"), "\(pod.stderr)")
    print("takeover pod: \(lines)")
    // The same inode as before all of it; the views still work; the store is consistent.
    let inodeAfter = try run(["unshare", "-m", "sh", "-c", "mount --bind '\(k)' /nix && stat -c %i \(big)"]).trimmed
    #expect(inodeAfter == inodeBefore)
    #expect(try node.pod(t, "exec /nix/var/result/bin/app").trimmed == "libdata")
    let fsck = try run([nixfsBinary, "fsck", "--state-dir", node.store.stateDir], check: false)
    #expect(fsck.status == 0 && fsck.text.contains("consistent"), "\(fsck.text) \(fsck.stderr)")
    try await node.withClients { _, csi in
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-t", target: t))
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-k", target: k))
    }
    // One daemon left, serving; the others exited.
    let alive = daemons.all.filter(\.isRunning)
    #expect(alive.count == 1 && alive.first === current)
  }

  /// A successor that cannot serve the connection the same way is refused with one line, and the
  /// running daemon serves on.
  @Test func incompatibleOrMisconfiguredSuccessorsAreRefused() throws {
    let node = try Node()
    let daemons = Daemons()
    defer {
      for d in daemons.all.reversed() { d.stop() }
      node.store.stop()
    }
    let hello = node.store.path("\(node.fx.paths["kinds"]!.baseName)/hello.txt")
    #expect(FileManager.default.contents(atPath: hello) == Data("hello, world\n".utf8))
    func refused(_ p: BackgroundProcess, _ reason: String) {
      #expect(p.wait(seconds: 60))
      #expect(!p.isRunning && p.process.terminationStatus != 0)
      let errors = p.stderr.split(separator: "\n").filter { $0.hasPrefix("nixfs: error:") }
      #expect(errors.count == 1 && errors[0].contains(reason), "\(p.stderr)")
      #expect(node.store.daemon.isRunning)
      #expect(FileManager.default.contents(atPath: hello) == Data("hello, world\n".utf8), "the old daemon stopped serving")
    }
    refused(
      try successor(node, daemons, environment: ["NIXFS_TEST_HANDOVER_FORMAT": "999"]), "handover format 999")
    refused(try successor(node, daemons, mountpoint: node.tmp.sub("elsewhere")), "serves \(node.store.mountpoint)")
    let bad = try BackgroundProcess(
      [nixfsBinary, "mount", "--state-dir", node.store.stateDir, "--max-size", "lots"] + node.mountArguments
        + [node.store.mountpoint])
    daemons.all.append(bad)
    refused(bad, "--max-size lots")
    // It never got as far as asking.
    #expect(!node.store.daemon.stderr.contains("--max-size"))
  }
}
