import CSINode
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import NixFormats
import Testing
import TestSupport

#if canImport(Glibc)
  import Glibc
#endif

/// A node as kubelet sees it: a cache, `nixfs mount`, and `nixfs csi` on a Unix socket.
final class Node: @unchecked Sendable {
  let tmp: TemporaryDirectory
  let server: CacheServer
  let store: MountedStore
  var csi: BackgroundProcess?
  let socket: String
  let fx: StoreFixture
  /// `nixfs keeper`, when the node runs one (started before the daemon, stopped after it).
  let keeper: BackgroundProcess?
  /// What `nixfs mount` was started with, for successors.
  let mountArguments: [String]

  /// Extra `nixfs csi` arguments (the plugin runs with the project's Nix settings).
  let csiArguments: [String]

  init(cache: String? = nil, withKeeper: Bool = false, csiArguments: [String] = [], extraMountArguments: [String] = []) throws {
    self.csiArguments = csiArguments
    fx = try StoreFixture.shared()
    tmp = try TemporaryDirectory("csi")
    server = try CacheServer(directory: cache ?? fx.caches["zstd"]!)
    var extra: [String] = []
    if withKeeper {
      let k = try BackgroundProcess([nixfsBinary, "keeper", "--socket", tmp.sub("keeper/keeper.sock")])
      keeper = k
      let deadline = Date().addingTimeInterval(30)
      while !FileManager.default.fileExists(atPath: tmp.sub("keeper/keeper.sock")) {
        guard k.isRunning, Date() < deadline else { throw CommandError(argv: k.argv, status: -1, stderr: k.stderr) }
        usleep(20_000)
      }
      extra = ["--keeper", tmp.sub("keeper/keeper.sock")]
    } else {
      keeper = nil
    }
    mountArguments = fx.mountArguments(server, extra: extra + extraMountArguments)
    store = try MountedStore(mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"), arguments: mountArguments)
    socket = tmp.sub("plugin/csi.sock")
    try startCSI()
  }

  func startCSI() throws {
    let p = try BackgroundProcess(
      [nixfsBinary, "csi", "--state-dir", store.stateDir, "--endpoint", "unix://\(socket)", "--node-id", "node-1"]
        + csiArguments, environment: NixFixture.environment)
    let deadline = Date().addingTimeInterval(30)
    while !acceptsConnections(unixSocket: socket) {
      guard p.isRunning, Date() < deadline else { throw CommandError(argv: p.argv, status: -1, stderr: p.stderr) }
      usleep(20_000)
    }
    csi = p
  }

  func stopCSI() {
    csi?.stop()
    csi = nil
  }

  deinit {
    // The daemon first (with a keeper, SIGTERM leaves the mount to it), then the keeper.
    csi?.stop()
    store.stop()
    keeper?.stop()
  }

  func target(_ name: String) -> String { tmp.sub("pods/\(name)/volumes/nix") }

  func withClients<T: Sendable>(_ body: @Sendable (Csi_V1_Identity.Client<HTTP2ClientTransport.Posix>, Csi_V1_Node.Client<HTTP2ClientTransport.Posix>) async throws -> T) async throws -> T {
    try await withGRPCClient(
      transport: .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
    ) { client in
      try await body(Csi_V1_Identity.Client(wrapping: client), Csi_V1_Node.Client(wrapping: client))
    }
  }

  func publishRequest(volume: String, target: String, attributes: [String: String], readOnly: Bool = true)
    -> Csi_V1_NodePublishVolumeRequest
  {
    var r = Csi_V1_NodePublishVolumeRequest()
    r.volumeID = volume
    r.targetPath = target
    var cap = Csi_V1_VolumeCapability()
    cap.mount = Csi_V1_VolumeCapability.MountVolume()
    var mode = Csi_V1_VolumeCapability.AccessMode()
    mode.mode = readOnly ? .singleNodeReaderOnly : .singleNodeWriter
    cap.accessMode = mode
    r.volumeCapability = cap
    r.readonly = readOnly
    r.volumeContext = attributes.merging(["csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p"]) { a, _ in a }
    return r
  }

  func unpublishRequest(volume: String, target: String) -> Csi_V1_NodeUnpublishVolumeRequest {
    var r = Csi_V1_NodeUnpublishVolumeRequest()
    r.volumeID = volume
    r.targetPath = target
    return r
  }

  /// Runs `command` as a "pod": a private mount namespace with the volume bound at /nix (with
  /// its submounts, as a container runtime binds volumes), and the project's Nix settings.
  func pod(_ target: String, _ command: String) throws -> CommandResult {
    try FileManager.default.createDirectory(atPath: "/nix", withIntermediateDirectories: true)
    return try run(
      ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount --rbind '\(target)' /nix && \(command)"],
      environment: NixFixture.environment, check: false)
  }
}

func rpcError(_ body: () async throws -> Void) async -> RPCError? { await caught(RPCError.self, body) }

func code(_ body: () async throws -> Void) async -> RPCError.Code? {
  do {
    try await body()
    return nil
  } catch let e as RPCError {
    return e.code
  } catch {
    return .unknown
  }
}

@Suite(.serialized) struct CSINodeTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  @Test func identityAndNodeInfo() async throws {
    let node = try Node()
    try await node.withClients { identity, csiNode in
      let info = try await identity.getPluginInfo(Csi_V1_GetPluginInfoRequest())
      #expect(info.name == "csi.nixfs.dev")
      #expect(info.vendorVersion == NixFSVersion.string)
      let caps = try await identity.getPluginCapabilities(Csi_V1_GetPluginCapabilitiesRequest())
      #expect(caps.capabilities.isEmpty)
      #expect(try await identity.probe(Csi_V1_ProbeRequest()).ready.value)
      #expect(try await csiNode.nodeGetInfo(Csi_V1_NodeGetInfoRequest()).nodeID == "node-1")
      #expect(try await csiNode.nodeGetCapabilities(Csi_V1_NodeGetCapabilitiesRequest()).capabilities.isEmpty)
    }
    // Probe is not ready when the mount daemon is gone.
    node.store.stop()
    try await node.withClients { identity, _ in
      let ready = try await identity.probe(Csi_V1_ProbeRequest()).ready.value
      #expect(ready == false)
    }
  }

  /// Publish returns without downloading a NAR; the view holds exactly the closure; a pod runs
  /// the program; two pods share inodes; unpublish removes the target.
  @Test func publishRunUnpublish() async throws {
    let node = try Node()
    let app = fx.paths["app"]!
    let closure = Set(["app", "lib", "busybox"].map { fx.paths[$0]!.baseName })
    let t1 = node.target("pod-1")
    let t2 = node.target("pod-2")
    try await node.withClients { _, csi in
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-1", target: t1, attributes: ["x86_64-linux": app.path]))
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-2", target: t2, attributes: ["storePath": app.path]))
    }
    #expect(StoreFixture.narRequests(node.server).isEmpty)
    #expect(isMountPoint(t1) && isMountPoint(t2))
    #expect(Set(try FileManager.default.contentsOfDirectory(atPath: "\(t1)/store")) == closure)
    #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(t1)/var/result") == app.path)
    // Paths outside the closure are not in the view, even when the cache has them.
    #expect(!FileManager.default.fileExists(atPath: "\(t1)/store/\(fx.paths["unrelated"]!.baseName)"))
    let out = try node.pod(t1, "exec /nix/var/result/bin/app")
    #expect(out.trimmed == "libdata", "\(out.stderr)")
    var s1 = stat()
    var s2 = stat()
    let lib = fx.paths["lib"]!.baseName
    #expect(stat("\(t1)/store/\(lib)/lib/numbers", &s1) == 0 && stat("\(t2)/store/\(lib)/lib/numbers", &s2) == 0)
    #expect(s1.st_ino == s2.st_ino)
    // Read-only in the pod.
    #expect(try node.pod(t1, "touch /nix/store/x").status != 0)

    try await node.withClients { _, csi in
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-1", target: t1))
      // Again, and for a volume nobody knows: both fine.
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-1", target: t1))
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "nope", target: node.target("nope")))
    }
    #expect(!FileManager.default.fileExists(atPath: t1))
    #expect(isMountPoint(t2))
  }

  @Test func idempotencyAndErrors() async throws {
    let port = try freePort()
    let node = try Node(csiArguments: ["--metrics-listen", "127.0.0.1:\(port)"])
    let app = fx.paths["app"]!.path
    let t = node.target("pod-e")
    try await node.withClients { _, csi in
      let req = node.publishRequest(volume: "vol-e", target: t, attributes: ["storePath": app])
      _ = try await csi.nodePublishVolume(req)
      _ = try await csi.nodePublishVolume(req)  // the same twice is fine
      let other = node.publishRequest(volume: "vol-e", target: t, attributes: ["storePath": fx.paths["lib"]!.path])
      #expect(await code { _ = try await csi.nodePublishVolume(other) } == .alreadyExists)

      var noID = req
      noID.volumeID = ""
      #expect(await code { _ = try await csi.nodePublishVolume(noID) } == .invalidArgument)
      var noTarget = req
      noTarget.targetPath = ""
      #expect(await code { _ = try await csi.nodePublishVolume(noTarget) } == .invalidArgument)
      var noCap = req
      noCap.clearVolumeCapability()
      #expect(await code { _ = try await csi.nodePublishVolume(noCap) } == .invalidArgument)
      for bad in ["/nix/store/../etc/passwd", "/nix//store/\(fx.paths["app"]!.baseName)", "/gnu/store/\(fx.paths["app"]!.baseName)",
        app + "/bin/app", "relative"]
      {
        let r = node.publishRequest(volume: "vol-bad", target: node.target("bad"), attributes: ["storePath": bad])
        #expect(await code { _ = try await csi.nodePublishVolume(r) } == .invalidArgument, "\(bad)")
      }
      let none = node.publishRequest(volume: "vol-none", target: node.target("none"), attributes: ["unrelated": "x"])
      #expect(await code { _ = try await csi.nodePublishVolume(none) } == .invalidArgument)
      let flake = node.publishRequest(volume: "vol-f", target: node.target("f"), attributes: ["flakeRef": "nixpkgs#hello"])
      #expect(await code { _ = try await csi.nodePublishVolume(flake) } == .failedPrecondition)
      let missing = node.publishRequest(
        volume: "vol-m", target: node.target("m"), attributes: ["storePath": "/nix/store/00000000000000000000000000000000-missing"])
      #expect(await code { _ = try await csi.nodePublishVolume(missing) } == .notFound)
      var noUnpubID = node.unpublishRequest(volume: "", target: t)
      #expect(await code { _ = try await csi.nodeUnpublishVolume(noUnpubID) } == .invalidArgument)
      noUnpubID = node.unpublishRequest(volume: "vol-e", target: "")
      #expect(await code { _ = try await csi.nodeUnpublishVolume(noUnpubID) } == .invalidArgument)
    }
    // The plugin's own metrics: every call by method and status, publish latency by outcome.
    let body = try httpBody("http://127.0.0.1:\(port)/metrics")
    func value(_ series: String) -> Double? {
      body.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }
    let publish = "nixfs_csi_requests_total{method=\"NodePublishVolume\""
    #expect(value(publish + ",code=\"OK\"}") == 2, "\(body)")
    #expect(value(publish + ",code=\"AlreadyExists\"}") == 1)
    #expect(value(publish + ",code=\"InvalidArgument\"}") == 9)
    #expect(value(publish + ",code=\"NotFound\"}") == 1)
    #expect(value(publish + ",code=\"FailedPrecondition\"}") == 1)
    #expect(value(publish + ",code=\"Internal\"}") == 0, "present before it happens")
    #expect(value("nixfs_csi_requests_total{method=\"NodeUnpublishVolume\",code=\"InvalidArgument\"}") == 2)
    #expect(value("nixfs_csi_publish_duration_seconds_count{outcome=\"ok\"}") == 2)
    #expect(body.contains("# HELP nixfs_csi_requests_total ") && body.contains("# HELP nixfs_csi_publish_duration_seconds "))
    // Each failure is logged with the volume and the pod.
    let log = node.csi?.stderr ?? ""
    let failed = log.split(separator: "\n").filter { $0.contains("NodePublishVolume failed") }
    #expect(failed.count == 12, "\(log)")
    #expect(failed.contains { $0.contains("volume=vol-m") && $0.contains("pod=p") && $0.contains("code=NotFound") }, "\(log)")
  }

  /// Targets that would mount the view somewhere else than asked: a symlink (onto a stand-in for
  /// /etc), a symlink on the way, a relative path, `..`. Oversized and binary input comes back
  /// as a short error.
  @Test func hostileTargetsAndValuesAreRefused() async throws {
    let node = try Node()
    let app = fx.paths["app"]!.path
    let victim = node.tmp.sub("etc")
    try Tree.file("\(victim)/passwd", "root:x:0:0\n")
    try Tree.directory(node.tmp.sub("pods"))
    try Tree.symlink(node.tmp.sub("pods/evil"), to: victim)
    try Tree.symlink(node.tmp.sub("pods/via"), to: victim)
    try await node.withClients { _, csi in
      for (target, why) in [
        (node.tmp.sub("pods/evil"), "symlink"), (node.tmp.sub("pods/via/mount"), "symlink"),
        ("pods/relative/mount", "not absolute"), (node.tmp.sub("pods/a/../b"), "not a normal path"),
      ] {
        let r = node.publishRequest(volume: "vol-h", target: target, attributes: ["storePath": app])
        let error = await rpcError { _ = try await csi.nodePublishVolume(r) }
        #expect(error?.code == .invalidArgument, "\(target)")
        #expect(error?.message.contains(why) == true, "\(target): \(error?.message ?? "")")
      }
      #expect(!isMountPoint(victim))
      #expect(!FileManager.default.fileExists(atPath: "\(victim)/mount"))
      #expect(try String(contentsOfFile: "\(victim)/passwd", encoding: .utf8) == "root:x:0:0\n")

      let huge = node.publishRequest(
        volume: "vol-big", target: node.target("big"),
        attributes: ["storePath": (0..<10_000).map { _ in app }.joined(separator: " ")])
      let big = await rpcError { _ = try await csi.nodePublishVolume(huge) }
      #expect(big?.code == .invalidArgument)
      #expect((big?.message.utf8.count ?? .max) < 1200, "\(big?.message.utf8.count ?? 0) bytes")
      let nul = node.publishRequest(volume: "vol\u{0}\u{1b}[2J", target: node.target("nul"), attributes: ["storePath": app])
      let binary = await rpcError { _ = try await csi.nodePublishVolume(nul) }
      #expect(binary?.code == .invalidArgument)
      #expect(binary?.message.unicodeScalars.contains { $0.value < 0x20 } == false)

      // The refusals left nothing behind: the same volume publishes at a proper target.
      let good = node.publishRequest(volume: "vol-h", target: node.target("good"), attributes: ["storePath": app])
      _ = try await csi.nodePublishVolume(good)
      #expect(isMountPoint(node.target("good")))
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-h", target: node.target("good")))
      #expect(!isMountPoint(node.target("good")))
    }
  }

  @Test func untrustedPathIsFailedPrecondition() async throws {
    let tmp = try TemporaryDirectory("csi-untrusted")
    let cache = try fx.copyCache("zstd", to: tmp.sub("cache"))
    let app = fx.paths["app"]!
    var info = try fx.narInfo(app)
    info.signatures = [SecretKey(generatingWithName: "someone-else").sign(info.fingerprint)]
    try info.serialized.write(toFile: "\(cache)/\(app.hashPart).narinfo", atomically: true, encoding: .utf8)
    let node = try Node(cache: cache)
    try await node.withClients { _, csi in
      let r = node.publishRequest(volume: "vol-u", target: node.target("u"), attributes: ["storePath": app.path])
      do {
        _ = try await csi.nodePublishVolume(r)
        Issue.record("untrusted path published")
      } catch let e as RPCError {
        #expect(e.code == .failedPrecondition)
        #expect(e.message.contains(app.path) && e.message.contains("someone-else"))
      }
    }
  }

  /// Stopping the plugin leaves running pods' files readable; a restarted plugin reconciles and
  /// can unpublish what its predecessor published.
  @Test func pluginRestartKeepsPods() async throws {
    let node = try Node()
    let app = fx.paths["app"]!
    let t = node.target("pod-r")
    try await node.withClients { _, csi in
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-r", target: t, attributes: ["storePath": app.path]))
    }
    // SIGTERM (kubelet stopping the pod): a graceful shutdown, exit 0, the socket removed.
    let plugin = try #require(node.csi)
    plugin.signal(SIGTERM)
    #expect(plugin.wait(seconds: 30), "the plugin did not stop on SIGTERM")
    #expect(plugin.process.terminationStatus == 0, "\(plugin.stderr)")
    #expect(plugin.stderr.contains("[CSINode] stopped"), "\(plugin.stderr)")
    #expect(!FileManager.default.fileExists(atPath: node.socket))
    node.stopCSI()
    #expect(try node.pod(t, "exec /nix/var/result/bin/app").trimmed == "libdata")
    try node.startCSI()
    #expect(isMountPoint(t))
    // The restarted plugin re-published the volume to the daemon: the pod's mount still works.
    #expect(try node.pod(t, "exec /nix/var/result/bin/app").trimmed == "libdata")
    try await node.withClients { _, csi in
      _ = try await csi.nodeUnpublishVolume(node.unpublishRequest(volume: "vol-r", target: t))
    }
    #expect(!FileManager.default.fileExists(atPath: t))
    // SIGHUP stops it the same way.
    let second = try #require(node.csi)
    second.signal(SIGHUP)
    #expect(second.wait(seconds: 30), "the plugin did not stop on SIGHUP")
    #expect(second.process.terminationStatus == 0, "\(second.stderr)")
  }
}

func isMountPoint(_ path: String) -> Bool {
  let text = String(decoding: readProcFile("/proc/self/mountinfo"), as: UTF8.self)
  return text.split(separator: "\n").contains { $0.split(separator: " ").count > 4 && $0.split(separator: " ")[4] == path }
}

/// flakeRef and nixExpr volumes: `nix eval` runs off the publish queue, bounded in time, with
/// Nix's own error line in the answer, and stderr read as it comes.
@Suite(.serialized) struct EvaluationTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// The call's status code and message; nil only when it succeeded (a transport failure or any
  /// other error is `.unknown`, never mistaken for success).
  func message(_ body: () async throws -> Void) async -> (RPCError.Code?, String) {
    do {
      try await body()
      return (nil, "")
    } catch let e as RPCError {
      return (e.code, e.message)
    } catch {
      return (.unknown, "\(error)")
    }
  }

  @Test func slowFailingAndChattyEvaluations() async throws {
    let node = try Node(csiArguments: ["--nix", "/usr/bin/nix", "--evaluation-timeout", "3"])
    let app = fx.paths["app"]!.path
    try await node.withClients { _, csi in
      // Seconds of CPU in Nix's evaluator, and no store path at the end of them.
      let slow = node.publishRequest(
        volume: "vol-slow", target: node.target("slow"),
        attributes: [
          "nixExpr":
            "let f = n: if n == 0 then 0 else 1 + f (n - 1); g = n: if n == 0 then 0 else (f 3000) + g (n - 1); in { outPath = toString (g 100000); }"
        ])
      let started = Date()
      async let slowOutcome = message { _ = try await csi.nodePublishVolume(slow) }
      // Meanwhile another volume publishes at once: the evaluation holds up no queue.
      try await Task.sleep(nanoseconds: 300_000_000)
      let quick = node.publishRequest(volume: "vol-quick", target: node.target("quick"), attributes: ["storePath": app])
      _ = try await csi.nodePublishVolume(quick)
      let quickDone = Date().timeIntervalSince(started)
      let (code, text) = await slowOutcome
      let slowDone = Date().timeIntervalSince(started)
      // Left alone, nix would finish (a minute or more) and print a number, which is no store
      // path: InvalidArgument. DeadlineExceeded comes only from the deadline killing it. (No wall
      // clock bound here: under the full suite this task may wait long for a thread.)
      #expect(code == .deadlineExceeded, "\(text)")
      #expect(text.contains("did not finish within 3 s"), "\(text)")
      #expect(quickDone < slowDone, "the storePath volume waited for the evaluation (\(quickDone) s, \(slowDone) s)")

      let broken = node.publishRequest(
        volume: "vol-broken", target: node.target("broken"), attributes: ["nixExpr": "{ outPath = undefinedVariable; }"])
      let (brokenCode, brokenText) = await message { _ = try await csi.nodePublishVolume(broken) }
      #expect(brokenCode == .invalidArgument)
      #expect(brokenText.contains("error:") && brokenText.contains("undefinedVariable"), "\(brokenText)")

      // 400 KB on stderr before the answer: read as it comes, so nothing blocks.
      let chatty = node.publishRequest(
        volume: "vol-chatty", target: node.target("chatty"),
        attributes: ["nixExpr": "{ outPath = builtins.trace (builtins.concatStringsSep \"\" (builtins.genList (x: \"0123456789\") 40000)) \"\(app)\"; }"])
      let (chattyCode, chattyText) = await message { _ = try await csi.nodePublishVolume(chatty) }
      #expect(chattyCode == nil, "\(chattyText)")
    }
  }
}
