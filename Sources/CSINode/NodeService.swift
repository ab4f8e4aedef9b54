import Foundation
import GRPCCore
import Logging
import NixFormats
import NixState
import NodeControl
import Subprocess
import SwiftProtobuf
import Threads

#if canImport(System)
  import System
#else
  import SystemPackage
#endif

#if canImport(Glibc)
  import Glibc
#endif

/// CSI Node: publishes views of the node's one FUSE mount into pods.
public final class NodeService: Csi_V1_Node.SimpleServiceProtocol, Sendable {
  let config: CSIConfiguration
  let control: ControlClient
  let records: VolumeRecords
  let logger: Logger
  /// Serialises publish/unpublish (kubelet may retry while a call still runs), and keeps their
  /// blocking work (control socket, mount syscalls) off the concurrency pool.
  let serial = SerialWork()
  let metrics = CSIMetrics()

  public init(config: CSIConfiguration, logger: Logger) {
    self.config = config
    self.control = ControlClient(path: config.controlSocket)
    self.records = VolumeRecords(stateDir: config.stateDir)
    self.logger = logger
  }

  /// Messages quote what the client sent (attribute values, IDs, paths): bounded, so a request
  /// with a 380 KB attribute does not come back as an answer the client drops.
  static func fail(_ code: RPCError.Code, _ message: String) -> RPCError {
    RPCError(code: code, message: LogText.bounded(message, limit: 1024))
  }

  /// The longest volume ID accepted (kubelet's are a driver name and a pod UID or a PV name).
  static let maxVolumeIDLength = 1024

  static func checkVolumeID(_ id: String) throws {
    guard !id.isEmpty else { throw fail(.invalidArgument, "volume_id is required") }
    guard id.utf8.count <= maxVolumeIDLength else {
      throw fail(.invalidArgument, "volume_id is \(id.utf8.count) bytes, more than \(maxVolumeIDLength)")
    }
    guard !id.utf8.contains(where: { $0 < 0x20 || $0 == 0x7f }) else {
      throw fail(.invalidArgument, "volume_id '\(LogText.bounded(id))' contains control characters")
    }
  }

  static func checkTarget(_ raw: String) throws -> TargetPath {
    guard !raw.isEmpty else { throw fail(.invalidArgument, "target_path is required") }
    do { return try TargetPath(raw) } catch { throw fail(.invalidArgument, error.reason) }
  }

  public func nodeGetInfo(request: Csi_V1_NodeGetInfoRequest, context: ServerContext) async throws
    -> Csi_V1_NodeGetInfoResponse
  {
    var r = Csi_V1_NodeGetInfoResponse()
    r.nodeID = config.nodeID
    return r
  }

  public func nodeGetCapabilities(request: Csi_V1_NodeGetCapabilitiesRequest, context: ServerContext) async throws
    -> Csi_V1_NodeGetCapabilitiesResponse
  {
    // No STAGE_UNSTAGE_VOLUME: publish is the only step.
    Csi_V1_NodeGetCapabilitiesResponse()
  }

  static func code(_ failure: ControlFailure?) -> RPCError.Code {
    switch failure {
    case .invalidArgument: .invalidArgument
    case .notFound: .notFound
    case .untrusted: .failedPrecondition
    case .unavailable: .unavailable
    case .alreadyExists: .alreadyExists
    case .internalError, .none: .internalError
    }
  }

  public func nodePublishVolume(request: Csi_V1_NodePublishVolumeRequest, context: ServerContext) async throws
    -> Csi_V1_NodePublishVolumeResponse
  {
    try await observed(.publish, volumeID: request.volumeID, target: request.targetPath, context: request.volumeContext) {
      // The cheap checks before an evaluation that may take seconds.
      try Self.checkVolumeID(request.volumeID)
      _ = try Self.checkTarget(request.targetPath)
      let path = try await self.requestedPath(
        request.volumeContext.filter { !$0.key.hasPrefix("csi.storage.k8s.io/") }, context: request.volumeContext)
      return try await self.serial.run { try self.publish(request, path: path) }
    }
  }

  /// Runs one CSI call, counts it and, when it fails, logs why with the volume and the pod
  /// (kubelet passes the pod in the volume context: the CSIDriver's podInfoOnMount).
  func observed<T>(
    _ method: CSIMetrics.Method, volumeID: String, target: String, context: [String: String] = [:],
    _ body: () async throws -> T
  ) async throws -> T {
    let started = ContinuousClock.now
    do {
      let r = try await body()
      metrics.record(method, error: nil, seconds: (ContinuousClock.now - started) / .seconds(1))
      return r
    } catch {
      metrics.record(method, error: error, seconds: (ContinuousClock.now - started) / .seconds(1))
      var metadata: Logger.Metadata = [
        "volume": "\(LogText.bounded(volumeID))", "target": "\(LogText.bounded(target))",
        "code": "\(CSIMetrics.codeName(error))", "error": "\((error as? RPCError)?.message ?? "\(error)")",
      ]
      if let pod = context["csi.storage.k8s.io/pod.name"] { metadata["pod"] = "\(LogText.bounded(pod))" }
      if let ns = context["csi.storage.k8s.io/pod.namespace"] { metadata["namespace"] = "\(LogText.bounded(ns))" }
      logger.error("\(method.rawValue) failed", metadata: metadata)
      throw error
    }
  }

  func publish(_ request: Csi_V1_NodePublishVolumeRequest, path: StorePath) throws -> Csi_V1_NodePublishVolumeResponse {
    try Self.checkVolumeID(request.volumeID)
    let checkedTarget = try Self.checkTarget(request.targetPath)
    guard request.hasVolumeCapability else { throw Self.fail(.invalidArgument, "volume_capability is required") }
    if case .block = request.volumeCapability.accessType {
      throw Self.fail(.invalidArgument, "block volumes are not supported: nixfs volumes are filesystems")
    }
    let target = checkedTarget.path
    let attributes = request.volumeContext.filter { !$0.key.hasPrefix("csi.storage.k8s.io/") }
    let startupProfile = try Self.startupProfile(attributes)
    let writableLimit = try Self.writableSize(attributes)
    if let existing = records.byTarget(target) {
      guard existing.volumeID == request.volumeID && existing.attributes == attributes
        && existing.isReadOnly == request.readonly
      else {
        throw Self.fail(
          .alreadyExists,
          "\(target) already holds volume \(existing.volumeID) (\(existing.storePath)) with other attributes")
      }
      // A retry: done if the mount is there, otherwise finish the job.
      if Mounts.isMountPoint(target) { return Csi_V1_NodePublishVolumeResponse() }
    } else if let existing = records.get(request.volumeID) {
      throw Self.fail(
        .alreadyExists, "volume \(request.volumeID) is already published at \(existing.targetPath)")
    }

    let response: ControlResponse
    do {
      response = try control.send(
        .publish(volumeID: request.volumeID, storePath: path.path, startupProfile: startupProfile))
    } catch {
      throw Self.fail(.unavailable, "\(path): the nixfs mount daemon is not answering (\(error))")
    }
    guard let view = response.viewPath else {
      throw Self.fail(Self.code(response.failure), response.message ?? "\(path): publish failed")
    }
    let targetFD: Int32
    do { targetFD = try checkedTarget.openCreatingDirectories() } catch {
      _ = try? control.send(.unpublish(volumeID: request.volumeID))
      throw Self.fail(.invalidArgument, error.reason)
    }
    defer { close(targetFD) }
    let readOnly = request.readonly
    do {
      // Onto the directory we opened without following links, not onto whatever the path names now.
      if !Mounts.isMountPoint(target) {
        if readOnly {
          try Mounts.bindReadOnly(view, at: "/proc/self/fd/\(targetFD)", shownAs: target)
        } else {
          try mountWritable(
            view: view, state: response.nixState, volumeID: request.volumeID, limit: writableLimit,
            at: "/proc/self/fd/\(targetFD)", shownAs: target)
        }
      }
      // Read-only: Nix's state of the closure over the view's empty var/nix (in a read-write
      // volume it is the overlay's middle layer).
      if readOnly, let state = response.nixState, !Mounts.isMountPoint(target + "/var/nix") {
        try Mounts.bindReadOnly(state + "/var/nix", at: target + "/var/nix")
      }
      try records.put(
        VolumeRecord(
          volumeID: request.volumeID, targetPath: target, storePath: path.path, attributes: attributes,
          readOnly: readOnly, nixState: response.nixState))
    } catch {
      try? Mounts.unmount(target + "/var/nix")
      try? Mounts.unmount(target)
      if !readOnly { WritableVolume(stateDir: config.stateDir, volumeID: request.volumeID, limit: writableLimit).remove() }
      _ = try? control.send(.unpublish(volumeID: request.volumeID))
      if let rpc = error as? RPCError { throw rpc }
      throw Self.fail(.internalError, "\(path): cannot mount the view at \(target): \(error)")
    }
    metrics.volumes(records.all)
    logger.info(
      "published",
      metadata: [
        "volume": "\(LogText.bounded(request.volumeID))", "path": "\(path)", "target": "\(LogText.bounded(target))",
        "closure": "\(response.closure?.count ?? 0)", "access": "\(readOnly ? "read-only" : "read-write")",
      ])
    return Csi_V1_NodePublishVolumeResponse()
  }

  /// The overlay of a read-write volume: the closure's Nix state over the view, and an upper of
  /// its own. A node where it cannot be mounted (no overlayfs, an unsuitable upper) fails the
  /// publish with FailedPrecondition, naming the cause.
  func mountWritable(
    view: String, state: String?, volumeID: String, limit: UInt64?, at target: String, shownAs: String
  ) throws {
    let volume = WritableVolume(stateDir: config.stateDir, volumeID: volumeID, limit: limit)
    do {
      try volume.create()
    } catch {
      throw Self.fail(.failedPrecondition, "cannot make the writable layer of volume \(volumeID): \(error)")
    }
    do {
      try Mounts.overlay(lowers: [state, view].compactMap { $0 }, upper: volume.upper, work: volume.work, at: target, shownAs: shownAs)
    } catch {
      volume.remove()
      throw Self.fail(
        .failedPrecondition,
        "cannot mount the read-write volume \(volumeID): \(error) (does this kernel have overlayfs, and the state directory's file system xattrs and d_type? see the kernel log)")
    }
  }

  public func nodeUnpublishVolume(request: Csi_V1_NodeUnpublishVolumeRequest, context: ServerContext) async throws
    -> Csi_V1_NodeUnpublishVolumeResponse
  {
    try await observed(.unpublish, volumeID: request.volumeID, target: request.targetPath) {
      try Self.checkVolumeID(request.volumeID)
      let target = try Self.checkTarget(request.targetPath).path
      let volumeID = request.volumeID
      try await self.serial.run { try self.unpublish(volumeID: volumeID, target: target) }
      return Csi_V1_NodeUnpublishVolumeResponse()
    }
  }

  func unpublish(volumeID: String, target: String) throws {
    do {
      try Mounts.unmount(target + "/var/nix")
      try Mounts.unmount(target)
    } catch {
      throw Self.fail(.internalError, "volume \(volumeID): \(error)")
    }
    // Remove the directory we created; only if it is empty, so nothing of the pod's is lost.
    rmdir(target)
    // What a read-write pod wrote is discarded with it, as with nix-csi.
    WritableVolume(stateDir: config.stateDir, volumeID: volumeID, limit: nil).remove()
    _ = try? control.send(.unpublish(volumeID: volumeID))
    try? records.remove(volumeID)
    StateLayer.removeUnused(stateDir: config.stateDir, keep: Set(records.all.compactMap(\.nixState)))
    metrics.volumes(records.all)
    logger.info("unpublished", metadata: ["volume": "\(LogText.bounded(volumeID))", "target": "\(LogText.bounded(target))"])
  }

  /// On start: volumes whose target is no longer mounted (their pods are gone) are unpublished and
  /// unpinned; the others are published again, so the daemon pins them after its own restart.
  public func reconcile() {
    let mounted = Mounts.mountPoints()
    for r in records.all {
      if mounted.contains(r.targetPath) {
        _ = try? control.send(.publish(volumeID: r.volumeID, storePath: r.storePath, startupProfile: false))
        logger.info("kept", metadata: ["volume": "\(r.volumeID)", "target": "\(r.targetPath)"])
      } else {
        try? unpublish(volumeID: r.volumeID, target: r.targetPath)
      }
    }
    // What a crash or a reboot left: writable layers and Nix states of volumes no longer published.
    let kept = Set(records.all.map { WritableVolume.name($0.volumeID) })
    let root = WritableVolume.root(stateDir: config.stateDir)
    for name in (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [] where !kept.contains(name) {
      WritableVolume(directory: (root as NSString).appendingPathComponent(name), limit: nil).remove()
      logger.info("removed the writable layer of a volume no longer published", metadata: ["directory": "\(name)"])
    }
    StateLayer.removeUnused(stateDir: config.stateDir, keep: Set(records.all.compactMap(\.nixState)))
    metrics.volumes(records.all)
  }

  public func nodeStageVolume(request: Csi_V1_NodeStageVolumeRequest, context: ServerContext) async throws
    -> Csi_V1_NodeStageVolumeResponse
  { throw Self.fail(.unimplemented, "nixfs does not stage volumes") }

  public func nodeUnstageVolume(request: Csi_V1_NodeUnstageVolumeRequest, context: ServerContext) async throws
    -> Csi_V1_NodeUnstageVolumeResponse
  { throw Self.fail(.unimplemented, "nixfs does not stage volumes") }

  public func nodeGetVolumeStats(request: Csi_V1_NodeGetVolumeStatsRequest, context: ServerContext) async throws
    -> Csi_V1_NodeGetVolumeStatsResponse
  { throw Self.fail(.unimplemented, "nixfs does not report volume stats") }

  public func nodeExpandVolume(request: Csi_V1_NodeExpandVolumeRequest, context: ServerContext) async throws
    -> Csi_V1_NodeExpandVolumeResponse
  { throw Self.fail(.unimplemented, "nixfs volumes cannot be expanded") }
}
