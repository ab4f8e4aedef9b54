import Foundation
import GRPCCore
import NixFormats
import NodeControl
import Subprocess

#if canImport(System)
  import System
#else
  import SystemPackage
#endif

#if canImport(Glibc)
  import Glibc
#endif

// What a volume asks for: its attributes, and the evaluation of flakeRef and nixExpr.
extension NodeService {
  /// Which store path the volume attributes ask for: `<system>`, then `storePath`, then `flakeRef`,
  /// then `nixExpr` (the last two need a nix binary on the node).
  /// `startupProfile: "false"` turns learned prefetch off for a volume (on by default).
  static func startupProfile(_ attributes: [String: String]) throws -> Bool {
    switch attributes["startupProfile"] {
    case nil, "true": return true
    case "false": return false
    case let other?:
      throw fail(.invalidArgument, "volumeAttributes startupProfile is \(LogText.bounded(other, limit: 64)): expected true or false")
    }
  }

  /// `writableSize` (a read-write volume's limit, a Kubernetes quantity such as `2Gi`): nil when
  /// unset (the upper is a directory on the node's disk, as large as that disk allows).
  static func writableSize(_ attributes: [String: String]) throws -> UInt64? {
    guard let text = attributes["writableSize"] else { return nil }
    guard let bytes = WritableVolume.parseSize(text) else {
      throw fail(
        .invalidArgument,
        "volumeAttributes writableSize is \(LogText.bounded(text, limit: 64)): expected a size of at least 16Mi such as 2Gi or 500M")
    }
    return bytes
  }

  /// The store path a volume asks for. Evaluating a flakeRef or nixExpr runs `nix eval` (bounded
  /// by `evaluationTimeout`), so this is called before the publish queue: one slow evaluation
  /// never holds up the node's other publishes.
  func requestedPath(_ attributes: [String: String], context: [String: String] = [:]) async throws -> StorePath {
    let text: String
    let pod = context["csi.storage.k8s.io/pod.name"]
    let namespace = context["csi.storage.k8s.io/pod.namespace"]
    if let p = attributes[config.system] {
      text = p
    } else if let p = attributes["storePath"] {
      text = p
    } else if let flake = attributes["flakeRef"] {
      if let built = try await built(.init(flakeRef: flake, pod: pod, namespace: namespace)) {
        text = built
      } else {
        text = try await evaluate(["eval", "--raw", flake], what: "flakeRef \(flake)")
      }
    } else if let expr = attributes["nixExpr"] {
      if let built = try await built(.init(nixExpr: expr, pod: pod, namespace: namespace)) {
        text = built
      } else {
        text = try await evaluate(["eval", "--raw", "--impure", "--expr", "(\(expr)).outPath"], what: "nixExpr")
      }
    } else if let drv = attributes["derivation"] {
      guard let built = try await built(.init(derivation: drv, pod: pod, namespace: namespace)) else {
        throw Self.fail(.failedPrecondition, "derivation \(LogText.bounded(drv, limit: 200)) needs a cluster cache that builds (nixfs serve --build) among the substituters")
      }
      text = built
    } else {
      let systems = attributes.keys.filter { $0.hasSuffix("-linux") || $0.hasSuffix("-darwin") }.sorted()
      let hint = systems.isEmpty ? "" : " (this node is \(config.system); the volume names \(systems.joined(separator: ", ")))"
      throw Self.fail(.invalidArgument, "volumeAttributes need one of \(config.system), storePath, flakeRef or nixExpr\(hint)")
    }
    let path: StorePath
    do {
      path = try StorePath(text, storeDir: config.storeDir)
    } catch {
      throw Self.fail(.invalidArgument, LogText.bounded("\(error)", limit: 512))
    }
    // A derivation names what to build: its output, from the cluster cache that builds (without
    // one, the .drv file itself is published, as before).
    if path.name.hasSuffix(".drv"), attributes["derivation"] == nil,
      let built = try await built(.init(derivation: path.path, pod: pod, namespace: namespace))
    {
      do { return try StorePath(built, storeDir: config.storeDir) } catch {
        throw Self.fail(.internalError, LogText.bounded("the cluster cache built \(path): \(error)", limit: 512))
      }
    }
    return path
  }

  /// The store path the cluster cache built for `request`; nil when no substituter builds (the
  /// caller evaluates on the node, as before). A build that runs answers Unavailable, so kubelet
  /// retries (with backoff) instead of waiting in one call; a failed build FailedPrecondition
  /// with Nix's words.
  func built(_ request: NixfsWire.BuildRequest) async throws -> String? {
    let response: ControlResponse
    do {
      response = try await control.request(.build(request), timeout: 120)
    } catch {
      throw Self.fail(.unavailable, "the nixfs mount daemon is not answering (\(error))")
    }
    if let failure = response.failure {
      throw Self.fail(Self.code(failure), response.message ?? "the build request failed")
    }
    guard let answer = response.build else { return nil }
    switch answer.state {
    case "done":
      guard let path = answer.storePath else { throw Self.fail(.internalError, "the cluster cache built \(answer.what) but named no path") }
      return path
    case "building":
      throw Self.fail(
        .unavailable, "the cluster cache is building \(answer.what) (for \(Int(answer.seconds ?? 0)) s so far); the volume is published once it is done")
    default:
      throw Self.fail(.failedPrecondition, "cannot build \(answer.what): \(answer.message ?? "the build failed")")
    }
  }

  /// `nix ARGS` through swift-subprocess: both outputs read as they come (a chatty stderr cannot
  /// block it), at most `evaluationTimeout` seconds (then the process is killed). A failure says
  /// Nix's `error:` line; network failures are Unavailable (kubelet retries), others
  /// InvalidArgument.
  func evaluate(_ args: [String], what: String) async throws -> String {
    guard let nix = config.nixBinary else {
      throw Self.fail(.failedPrecondition, "\(what) needs a nix binary on the node (start nixfs csi with --nix PATH); use a \(config.system) or storePath attribute instead")
    }
    let timeout = config.evaluationTimeout
    // coreutils' timeout bounds it: TERM at the deadline, KILL 5 s later. (Cancelling the task
    // that waits for nix did not always reach nix under load.)
    let r: ExecutionResult<Void, StringOutput<UTF8>, StringOutput<UTF8>>
    do {
      r = try await Subprocess.run(
        .path(FilePath("/usr/bin/timeout")),
        arguments: Arguments(
          ["--kill-after=5", String(format: "%.3f", timeout), nix, "--extra-experimental-features", "nix-command flakes"] + args),
        output: .string(limit: 4 << 20), error: .string(limit: 4 << 20))
    } catch {
      throw Self.fail(.failedPrecondition, "cannot run \(nix): \(error)")
    }
    switch r.terminationStatus {
    case .exited(124), .exited(137), .signaled(SIGKILL):
      throw Self.fail(.deadlineExceeded, "cannot evaluate \(what): nix did not finish within \(Int(timeout)) s (--evaluation-timeout)")
    case let status where !status.isSuccess:
      let lines = r.standardError.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
      let line = lines.first { $0.hasPrefix("error:") } ?? lines.last ?? "nix exited with \(status)"
      let network = ["unable to download", "Could not resolve host", "Couldn't connect", "Connection refused", "timed out", "HTTP error"]
        .contains { r.standardError.contains($0) }
      throw Self.fail(network ? .unavailable : .invalidArgument, "cannot evaluate \(what): \(line)")
    default:
      return r.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)
    }
  }
}
