import CSINode
import Foundation
import GRPCCore
import NixFormats
import Testing
import TestSupport

/// A volume naming an expression no cache holds: the node asks the cluster cache that builds
/// (`nixfs serve --build`), kubelet hears Unavailable while it builds, and a retry publishes the
/// output, fetched lazily and verified like any path.
@Suite(.serialized) struct BuildVolumeTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  final class Cluster: @unchecked Sendable {
    let tmp: TemporaryDirectory
    let upstream: CacheServer
    let serve: BackgroundProcess
    let url: String
    let key: String
    let netrc: String

    init(_ fx: StoreFixture, upstreams extra: [String] = []) throws {
      tmp = try TemporaryDirectory("build-cluster")
      let nix = NixFixture(in: tmp.path)
      let (sk, pk) = try nix.generateKey("cluster-build-1")
      key = pk
      try "node:s3cret\n".write(toFile: tmp.sub("creds"), atomically: true, encoding: .utf8)
      netrc = tmp.sub("netrc")
      try "machine 127.0.0.1 login node password s3cret\n".write(toFile: netrc, atomically: true, encoding: .utf8)
      upstream = try CacheServer(directory: fx.caches["zstd"]!)
      serve = try BackgroundProcess([
        nixfsBinary, "serve", "--listen", "127.0.0.1:0", "--state-dir", tmp.sub("serve"), "--substituter", upstream.url,
      ] + extra.flatMap { ["--substituter", $0] } + [
        "--trusted-public-key", fx.publicKey, "--secret-key-file", sk, "--build", "--build-credentials-file", tmp.sub("creds"),
        "--build-wait", "1", "--log-level", "info",
      ])
      guard let line = serve.readLine(), let range = line.range(of: "http://") else {
        throw CommandError(argv: serve.argv, status: -1, stderr: serve.stderr)
      }
      url = String(line[range.lowerBound...])
    }

    func builds(_ outcome: String) throws -> Double {
      let text = try httpBody("\(url)/metrics")
      for line in text.split(separator: "\n") where line.hasPrefix("nixfs_serve_builds_total{") && line.contains("\"\(outcome)\"") {
        return Double(line.split(separator: " ").last ?? "") ?? -1
      }
      return -1
    }

    deinit { serve.stop() }
  }

  func expression(_ script: String) -> String {
    let bb = fx.paths["busybox"]!.path
    return """
      let bb = builtins.storePath "\(bb)"; in
      derivation { name = "volume-\(UUID().uuidString.prefix(8).lowercased())"; system = "x86_64-linux"; builder = "${bb}/bin/busybox";
        args = ["sh" "-c" "\(script.replacingOccurrences(of: "BB", with: "${bb}/bin/busybox"))"]; }
      """
  }

  /// Publishes until it is not Unavailable; returns the first error seen and the last outcome.
  func publishRetrying(_ node: Node, _ request: Csi_V1_NodePublishVolumeRequest) async throws -> (first: RPCError?, last: RPCError?) {
    var first: RPCError?
    let deadline = Date().addingTimeInterval(120)
    while true {
      let error = await rpcError { try await node.withClients { _, csi in _ = try await csi.nodePublishVolume(request) } }
      if first == nil { first = error }
      guard let error, error.code == .unavailable, Date() < deadline else { return (first, error) }
      try await Task.sleep(for: .milliseconds(300))
    }
  }

  @Test func aVolumeOfAnExpressionNoCacheHasIsBuiltAtTheClusterCache() async throws {
    let cluster = try Cluster(fx)
    let node = try Node(extraMountArguments: [
      "--substituter", cluster.url, "--trusted-public-key", cluster.key, "--netrc-file", cluster.netrc,
    ])
    let unique = UUID().uuidString.lowercased()  // never "BB", the script's busybox placeholder
    let expr = expression("BB sleep 2; BB echo \(unique) > $out")
    let t = node.target("pod-built")
    let request = node.publishRequest(volume: "vol-built", target: t, attributes: ["nixExpr": expr])
    let (first, last) = try await publishRetrying(node, request)
    #expect(first?.code == .unavailable && first?.message.contains("is building") == true, "\(String(describing: first))")
    #expect(last == nil, "\(String(describing: last)) \(cluster.serve.stderr.suffix(2000))")
    #expect(try node.pod(t, "cat /nix/var/result").trimmed == unique)
    // Another volume of the same expression: published at once, no second build.
    let t2 = node.target("pod-built-2")
    try await node.withClients { _, csi in
      _ = try await csi.nodePublishVolume(node.publishRequest(volume: "vol-built-2", target: t2, attributes: ["nixExpr": expr]))
    }
    #expect(try cluster.builds("succeeded") == 1)
    #expect(cluster.serve.stderr.contains("pod=p"), "the serve's log names the pod")
  }

  @Test func aFailedBuildIsFailedPreconditionWithTheBuildersWords() async throws {
    let cluster = try Cluster(fx)
    let node = try Node(extraMountArguments: [
      "--substituter", cluster.url, "--trusted-public-key", cluster.key, "--netrc-file", cluster.netrc,
    ])
    let request = node.publishRequest(
      volume: "vol-broken", target: node.target("pod-broken"), attributes: ["nixExpr": expression("echo no such tool here >&2; exit 3")])
    let (_, last) = try await publishRetrying(node, request)
    #expect(last?.code == .failedPrecondition && last?.message.contains("no such tool here") == true, "\(String(describing: last))")
    // Without a credential the serve refuses: a node with no netrc is told so.
    let stranger = try Node(extraMountArguments: ["--substituter", cluster.url, "--trusted-public-key", cluster.key])
    let refused = await rpcError {
      try await stranger.withClients { _, csi in
        _ = try await csi.nodePublishVolume(
          stranger.publishRequest(volume: "vol-x", target: stranger.target("pod-x"), attributes: ["nixExpr": expression("BB echo x > $out")]))
      }
    }
    #expect(refused?.code == .unavailable && refused?.message.contains("401") == true, "\(String(describing: refused))")
  }

  /// A volume naming a `.drv` (its derivation in a cache, its output in none): built at the
  /// cluster cache; a second node publishing it fetches the output with no second build.
  @Test func aDerivationPathIsBuiltOnceForTwoNodes() async throws {
    let tmp = try TemporaryDirectory("build-drv")
    let nix = NixFixture(in: tmp.path)
    let bb = fx.paths["busybox"]!.path
    let env = NixFixture.environment
    // The derivation, instantiated in a store of its own and copied, signed, to a cache.
    try run(
      ["nix", "copy", "--from", "file://\(fx.caches["zstd"]!)", "--to", nix.store, "--option", "trusted-public-keys", fx.publicKey, bb],
      environment: env)
    let unique = UUID().uuidString.lowercased()  // never "BB", the script's busybox placeholder
    let drv = try run(["nix-instantiate", "--store", nix.store, "-E", expression("BB echo \(unique) > $out")], environment: env).trimmed
    #expect(drv.hasSuffix(".drv"), "\(drv)")
    // `--derivation`: the .drv itself, not its (unbuilt) output.
    try run(["nix", "store", "sign", "--derivation", "--store", nix.store, "--key-file", "\(fx.nix.dir)/fs-test-1.sk", drv], environment: env)
    let drvCache = tmp.sub("drv-cache")
    try run(["nix", "copy", "--derivation", "--store", nix.store, "--to", "file://\(drvCache)?compression=zstd", drv], environment: env)
    let drvServer = try CacheServer(directory: drvCache)
    let cluster = try Cluster(fx, upstreams: [drvServer.url])
    let arguments = ["--substituter", cluster.url, "--trusted-public-key", cluster.key, "--netrc-file", cluster.netrc]
    let node = try Node(extraMountArguments: arguments)
    let t = node.target("pod-drv")
    let (_, last) = try await publishRetrying(node, node.publishRequest(volume: "vol-drv", target: t, attributes: ["storePath": drv]))
    #expect(last == nil, "\(String(describing: last)) \(cluster.serve.stderr.suffix(2000))")
    #expect(try node.pod(t, "cat /nix/var/result").trimmed == unique)
    let second = try Node(extraMountArguments: arguments)
    let t2 = second.target("pod-drv-2")
    try await second.withClients { _, csi in
      _ = try await csi.nodePublishVolume(second.publishRequest(volume: "vol-drv-2", target: t2, attributes: ["storePath": drv]))
    }
    #expect(try second.pod(t2, "cat /nix/var/result").trimmed == unique)
    #expect(try cluster.builds("succeeded") == 1, "the second node's volume was not built again")
  }
}
