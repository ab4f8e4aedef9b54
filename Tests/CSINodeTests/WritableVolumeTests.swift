import CSINode
import Foundation
import GRPCCore
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A fully functional /nix in every volume: Nix's database for the closure, and read-write
/// volumes (overlayfs over the view) where real Nix, run as root in the pod, builds, copies and
/// collects garbage, while the closure stays lazy and shared.
@Suite(.serialized) struct WritableVolumeTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  func publish(_ node: Node, _ volume: String, _ target: String, readOnly: Bool, extra: [String: String] = [:]) async throws {
    let app = fx.paths["app"]!
    try await node.withClients { _, csi in
      _ = try await csi.nodePublishVolume(
        node.publishRequest(
          volume: volume, target: target, attributes: ["storePath": app.path].merging(extra) { a, _ in a }, readOnly: readOnly))
    }
  }

  func unpublish(_ node: Node, _ volume: String, _ target: String) async throws {
    try await node.withClients { _, csi in
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: volume, target: target))
    }
  }

  /// `nix` inside a read-write volume, with Nix's default paths: verify, query, build with the
  /// closure's busybox, copy the result out, collect garbage (only what the pod added goes).
  @Test func nixWorksInsideAReadWriteVolume() async throws {
    let node = try Node()
    let t = node.target("pod-rw")
    try await publish(node, "vol-rw", t, readOnly: false)
    let app = fx.paths["app"]!
    let busybox = fx.paths["busybox"]!
    let closure = ["app", "lib", "busybox"].map { fx.paths[$0]!.path }.sorted()
    let expr = node.tmp.sub("build.nix")
    try """
      derivation { name = "built-in-pod"; system = "x86_64-linux"; builder = "\(busybox.path)/bin/busybox";
        args = ["sh" "-c" "\(busybox.path)/bin/busybox echo made in the pod > $out"]; }
      """.write(toFile: expr, atomically: true, encoding: .utf8)
    let copyTo = node.tmp.sub("copied")
    let script = """
      set -e
      nix-store --verify --check-contents 2>&1
      echo PATHS $(nix path-info -r /nix/var/result | sort | tr '\\n' ' ')
      echo REFS $(nix-store -q --references /nix/var/result | sort | tr '\\n' ' ')
      out=$(nix-build --no-out-link '\(expr)')
      echo BUILT $out $(cat $out)
      nix-store --check-validity $out
      nix copy --to 'file://\(copyTo)' $out
      nix-store --gc 2>&1 | tail -1
      nix-store --check-validity $out 2>/dev/null && echo STILL-VALID || echo COLLECTED
      nix-store --check-validity \(closure.joined(separator: " ")) && echo CLOSURE-VALID
      /nix/var/result/bin/app
      """
    let r = try node.pod(t, script)
    #expect(r.status == 0, "\(r.text)\n\(r.stderr)")
    let lines = r.text.split(separator: "\n").map(String.init)
    #expect(lines.contains("PATHS \(closure.joined(separator: " "))"), "\(r.text)")
    let refs = ["lib", "busybox"].map { fx.paths[$0]!.path }.sorted().joined(separator: " ")
    #expect(lines.contains("REFS \(refs)"), "\(r.text)")
    let built = lines.first { $0.hasPrefix("BUILT ") }?.split(separator: " ")
    #expect(built?.count == 6 && built?[2] == "made" && built?[5] == "pod", "\(r.text)")
    #expect(lines.contains("COLLECTED") && lines.contains("CLOSURE-VALID") && lines.last == "libdata", "\(r.text)")
    // The copy is a real binary cache of the pod's build.
    let narinfos = try FileManager.default.contentsOfDirectory(atPath: copyTo).filter { $0.hasSuffix(".narinfo") }
    #expect(narinfos.count == 1, "\(narinfos)")
    _ = app
  }

  /// What a pod writes is its own: another volume of the same closure, a read-only one and the
  /// node's store never see it, and unpublish leaves nothing of the volume on disk. Unmodified
  /// files are the view's: one inode, one copy in the page cache.
  @Test func writesStayInTheirVolumeAndPagesAreShared() async throws {
    let node = try Node()
    let (a, b, ro) = (node.target("pod-a"), node.target("pod-b"), node.target("pod-ro"))
    try await publish(node, "vol-a", a, readOnly: false)
    try await publish(node, "vol-b", b, readOnly: false)
    try await publish(node, "vol-ro", ro, readOnly: true)
    let lib = fx.paths["lib"]!.baseName
    let numbers = "\(ro)/store/\(lib)/lib/numbers"
    #expect(try run(["fincore", "--bytes", "--noheadings", "--output", "RES", numbers]).trimmed == "0", "a fresh node")
    let w = try node.pod(a, "echo mine > /nix/store/\(lib)/mine && echo note > /nix/var/note && cat /nix/store/\(lib)/lib/numbers | wc -c")
    #expect(w.status == 0, "\(w.stderr)")
    let resident = Int(try run(["fincore", "--bytes", "--noheadings", "--output", "RES", numbers]).trimmed) ?? 0
    #expect(resident >= Int(w.trimmed) ?? 1, "a read through the overlay fills the view's pages: \(resident) bytes resident")
    var sa = stat()
    var sr = stat()
    #expect(stat("\(a)/store/\(lib)/lib/numbers", &sa) == 0 && stat(numbers, &sr) == 0)
    #expect(sa.st_ino == sr.st_ino, "one inode for the unmodified file")
    #expect(try node.pod(a, "cat /nix/store/\(lib)/mine").trimmed == "mine")
    for other in [b, ro] {
      #expect(try node.pod(other, "test -e /nix/store/\(lib)/mine || test -e /nix/var/note || echo absent").trimmed == "absent")
    }
    #expect(!FileManager.default.fileExists(atPath: node.store.path("\(lib)/mine")))
    // A read-only volume stays read-only, database included.
    #expect(try node.pod(ro, "touch /nix/store/x").status != 0)
    #expect(try node.pod(ro, "touch /nix/var/nix/db/db.sqlite").status != 0)
    let volumes = node.store.stateDir + "/volumes"
    #expect(try FileManager.default.contentsOfDirectory(atPath: volumes).count == 2)
    let status = try run([nixfsBinary, "status", "--state-dir", node.store.stateDir]).text
    #expect(status.contains("read-write: 2: vol-a (0.0 MiB written) vol-b (0.0 MiB written)"), "\(status)")
    try await unpublish(node, "vol-a", a)
    try await unpublish(node, "vol-b", b)
    #expect(try FileManager.default.contentsOfDirectory(atPath: volumes).isEmpty, "nothing of the volumes is left")
    #expect(!FileManager.default.fileExists(atPath: a))
    // The closure's Nix state stays while a volume uses it, and goes with the last one.
    let states = node.store.stateDir + "/nix-state"
    #expect(try FileManager.default.contentsOfDirectory(atPath: states).count == 1)
    try await unpublish(node, "vol-ro", ro)
    #expect(try FileManager.default.contentsOfDirectory(atPath: states).isEmpty)
  }

  /// The database in a read-only volume holds exactly the closure, as Nix's own would.
  @Test func aReadOnlyVolumeCarriesTheClosuresDatabase() async throws {
    let node = try Node()
    let t = node.target("pod-db")
    try await publish(node, "vol-db", t, readOnly: true)
    let query = """
      import sqlite3; db = sqlite3.connect("file:/nix/var/nix/db/db.sqlite?immutable=1", uri=True)
      print(" ".join(r[0] for r in db.execute("select path from ValidPaths order by path")))
      print(db.execute("select count(*) from Refs").fetchone()[0])
      """
    let r = try node.pod(t, "python3 -c '\(query)' && echo $(cat /nix/var/nix/db/schema) && readlink /nix/var/nix/gcroots/result && test -d /nix/store/.links && echo LINKS")
    #expect(r.status == 0, "\(r.stderr)")
    let lines = r.text.split(separator: "\n").map(String.init)
    #expect(lines.first == ["app", "lib", "busybox"].map { fx.paths[$0]!.path }.sorted().joined(separator: " "), "\(r.text)")
    #expect(Array(lines.dropFirst(2)) == ["10", "/nix/var/result", "LINKS"], "\(r.text)")
  }

  /// `writableSize`: a full upper is ENOSPC for its own pod only.
  @Test func aSizeLimitIsTheVolumesOwn() async throws {
    let node = try Node()
    let (small, other) = (node.target("pod-small"), node.target("pod-other"))
    try await publish(node, "vol-small", small, readOnly: false, extra: ["writableSize": "24Mi"])
    try await publish(node, "vol-other", other, readOnly: false)
    let full = try node.pod(small, "dd if=/dev/zero of=/nix/var/big bs=1M count=64 2>&1")
    #expect(full.status != 0 && full.text.contains("No space left on device"), "\(full.text)")
    let fine = try node.pod(other, "dd if=/dev/zero of=/nix/var/big bs=1M count=32 2>&1")
    #expect(fine.status == 0, "\(fine.text)")
    try await unpublish(node, "vol-small", small)
    try await unpublish(node, "vol-other", other)
    #expect(try FileManager.default.contentsOfDirectory(atPath: node.store.stateDir + "/volumes").isEmpty)
    let c = await code {
      try await publish(node, "vol-bad", node.target("pod-bad"), readOnly: false, extra: ["writableSize": "lots"])
    }
    #expect(c == .invalidArgument)
  }

  /// A restarted plugin removes the writable layers of volumes that are gone (a crash, a reboot).
  @Test func leftoversOfGoneVolumesAreRemovedAtStart() async throws {
    let node = try Node()
    let t = node.target("pod-gone")
    try await publish(node, "vol-gone", t, readOnly: false)
    node.stopCSI()
    // The pod's mount vanished with the node (a reboot): only the directories are left.
    _ = try run(["umount", "-l", t])
    try node.startCSI()
    let volumes = node.store.stateDir + "/volumes"
    #expect(try FileManager.default.contentsOfDirectory(atPath: volumes).isEmpty)
    #expect(try FileManager.default.contentsOfDirectory(atPath: node.store.stateDir + "/nix-state").isEmpty)
  }

  /// A volume ID cannot steer the writable layer out of the volumes directory, and a node where
  /// the layer cannot be made fails the publish with FailedPrecondition, naming the cause.
  @Test func badVolumeIDsAndUnsuitableDisksAreRefusedCleanly() async throws {
    let node = try Node()
    let t = node.target("pod-escape")
    try await publish(node, "../../../etc/escape", t, readOnly: false)
    let volumes = node.store.stateDir + "/volumes"
    let names = try FileManager.default.contentsOfDirectory(atPath: volumes)
    #expect(names.count == 1 && names[0].count == 32 && names[0].allSatisfy(\.isHexDigit), "\(names)")
    #expect(!FileManager.default.fileExists(atPath: node.store.stateDir + "/../../etc/escape"))
    try await unpublish(node, "../../../etc/escape", t)
    // A read-only file system where the writable layers go.
    _ = try run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", volumes])
    defer { _ = try? run(["umount", "-l", volumes], check: false) }
    let t2 = node.target("pod-ro-disk")
    let error = await rpcError { try await publish(node, "vol-ro-disk", t2, readOnly: false) }
    #expect(error?.code == .failedPrecondition, "\(String(describing: error))")
    #expect(error?.message.contains("writable layer") == true && error?.message.contains("Read-only file system") == true, "\(String(describing: error))")
    #expect(!isMountPoint(t2))
    // Read-only volumes need no writable layer.
    try await publish(node, "vol-fine", node.target("pod-fine"), readOnly: true)
  }

  /// A daemon takeover and a crash (the keeper holds the connection) leave a read-write pod
  /// working: its writes stay, the closure reads and runs.
  @Test func readWritePodsSurviveTakeoverAndCrash() async throws {
    let node = try Node(withKeeper: true)
    var daemons: [BackgroundProcess] = []
    defer {
      for d in daemons.reversed() { d.stop() }
      node.store.stop()
      node.keeper?.stop()
    }
    let t = node.target("pod-survive")
    try await publish(node, "vol-survive", t, readOnly: false)
    #expect(try node.pod(t, "echo before > /nix/var/mark").status == 0)
    func successor() throws -> BackgroundProcess {
      let p = try BackgroundProcess(
        [nixfsBinary, "mount", "--state-dir", node.store.stateDir] + node.mountArguments + [node.store.mountpoint])
      daemons.append(p)
      let deadline = Date().addingTimeInterval(60)
      while p.isRunning && !p.stderr.contains("FUSE connection") && Date() < deadline { usleep(10_000) }
      return p
    }
    var current = node.store.daemon
    for crash in [false, true] {
      if crash {
        current.signal(SIGKILL)
        #expect(current.wait(seconds: 30))
      }
      let next = try successor()
      #expect(next.isRunning, "\(next.stderr)")
      if !crash { #expect(current.wait(seconds: 30)) }
      current = next
      let r = try node.pod(t, "cat /nix/var/mark && /nix/var/result/bin/app && echo after >> /nix/var/mark && nix-store --check-validity /nix/var/result && echo VALID")
      #expect(r.status == 0 && r.text.contains("libdata") && r.text.contains("VALID"), "\(r.text) \(r.stderr)")
    }
    #expect(try node.pod(t, "cat /nix/var/mark").text == "before\nafter\nafter\n")
  }

  /// The same volume ID published again after its unpublish (a retried pod, a reconcile) is a new
  /// view: the kernel must not bind the old, gone one from its cache.
  @Test(arguments: [true, false])
  func aVolumePublishedAgainShowsItsClosure(readOnly: Bool) async throws {
    let node = try Node()
    let closure = Set(["app", "lib", "busybox"].map { fx.paths[$0]!.baseName })
    for round in 1...2 {
      let t = node.target("pod-again-\(round)")
      try await publish(node, "vol-again", t, readOnly: readOnly)
      // A read-write volume's store also lists the state layer's `.links`, as a real store does.
      let expected = readOnly ? closure : closure.union([".links"])
      #expect(Set(try FileManager.default.contentsOfDirectory(atPath: "\(t)/store")) == expected, "round \(round)")
      #expect(try node.pod(t, "/nix/var/result/bin/app").trimmed == "libdata", "round \(round)")
      try await unpublish(node, "vol-again", t)
    }
  }
}
