import Foundation
import NixFormats
#if canImport(Glibc)
  import Glibc
#endif

/// Requests a local client (the CSI node plugin, the CLI) sends to the mount daemon over its
/// control socket (`<state-dir>/control.sock`, owner-only). One JSON object per line each way.
public enum ControlRequest: Codable, Sendable, Equatable {
  case ping
  /// Resolve `storePath`'s closure (narinfos only, no NAR download), pin it, and expose it as a
  /// view; idempotent for the same volume and path. `startupProfile` (default on): prefetch what
  /// pods of this path read first, and report what this one reads.
  case publish(volumeID: String, storePath: String, startupProfile: Bool? = nil)
  case unpublish(volumeID: String)
  case views
  /// Materialise the closures of `storePaths` now (prefetch); answers when done.
  case fetch(storePaths: [String], parallel: Int)
  /// `nixfs gc` on a live node: evict until the store fits `maxStoredBytes`.
  case gc(maxStoredBytes: UInt64)
  /// `nixfs fsck` on a live node (checking only: repairs need the daemon stopped).
  case fsck
  /// A successor `nixfs mount` asks for the FUSE connection (see Handover.swift). The answer
  /// carries the /dev/fuse descriptor; the daemon exits once it is sent.
  case takeover(format: Int, version: String, mountpoint: String)
  /// What the daemon is, runs with and holds (`nixfs status`).
  case status
  /// Ask the cluster cache that builds (`nixfs serve --build`) for a volume's nixExpr, flakeRef
  /// or derivation; answers its state, or no `build` when no substituter builds.
  case build(NixfsWire.BuildRequest)
}

/// `nixfs status`: a running daemon's account of itself.
public struct DaemonStatus: Codable, Sendable, Equatable {
  /// One setting in effect, and where its value came from: `flag`, `nix.conf`, or `default`.
  public struct Setting: Codable, Sendable, Equatable {
    public var name: String
    public var value: String
    public var source: String
    public init(name: String, value: String, source: String) { (self.name, self.value, self.source) = (name, value, source) }
  }
  public struct Substituter: Codable, Sendable, Equatable {
    public var url: String
    public var priority: Int
    /// `nixfs/v1` when it offers chunk indexes.
    public var chunkIndex: String?
    public init(url: String, priority: Int, chunkIndex: String?) {
      self.url = url
      self.priority = priority
      self.chunkIndex = chunkIndex
    }
  }
  public var version: String
  public var pid: Int32
  public var mountpoint: String
  public var stateDir: String
  public var settings: [Setting]
  /// Those that answered; the others are in `unreachable`.
  public var substituters: [Substituter]
  public var unreachable: [String]
  /// Published volumes (view names).
  public var views: [String]
  /// The read-write volumes the CSI plugin published from this state directory, and what each
  /// pod wrote (filled in by `nixfs status` from the plugin's records, not by the daemon).
  public var readWriteVolumes: [ReadWriteVolume]?
  public struct ReadWriteVolume: Codable, Sendable, Equatable {
    public var volumeID: String
    public var target: String
    public var writtenBytes: UInt64
    /// `writableSize`, when the volume has one.
    public var limitBytes: UInt64?
    public init(volumeID: String, target: String, writtenBytes: UInt64, limitBytes: UInt64?) {
      (self.volumeID, self.target, self.writtenBytes, self.limitBytes) = (volumeID, target, writtenBytes, limitBytes)
    }
  }
  public var fetchesInFlight: [String]
  public var paths: Int
  public var partialPaths: Int
  public var storedBytes: UInt64
  public var budgetBytes: UInt64?
  public var chunksToFetch: Int
  /// FUSE passthrough: `on (N backing files open)`, `off: why`, or `starting`.
  public var passthrough: String?
  public init(
    version: String, pid: Int32, mountpoint: String, stateDir: String, settings: [Setting], substituters: [Substituter],
    unreachable: [String], views: [String], fetchesInFlight: [String], paths: Int, partialPaths: Int,
    storedBytes: UInt64, budgetBytes: UInt64?, chunksToFetch: Int
  ) {
    self.version = version
    self.pid = pid
    self.mountpoint = mountpoint
    self.stateDir = stateDir
    self.settings = settings
    self.substituters = substituters
    self.unreachable = unreachable
    self.views = views
    self.fetchesInFlight = fetchesInFlight
    self.paths = paths
    self.partialPaths = partialPaths
    self.storedBytes = storedBytes
    self.budgetBytes = budgetBytes
    self.chunksToFetch = chunksToFetch
  }
}

/// Where a daemon's control socket is: in its state directory (owner-only, like the directory).
public enum ControlSocket {
  public static let fileName = "control.sock"
  public static func path(stateDir: String) -> String { (stateDir as NSString).appendingPathComponent(fileName) }
}

/// Why a request failed, in the categories a pod's owner can act on.
public enum ControlFailure: String, Codable, Sendable {
  case invalidArgument, notFound, untrusted, unavailable, alreadyExists, internalError
}

public struct ControlResponse: Codable, Sendable, Equatable {
  public var failure: ControlFailure?
  public var message: String?
  /// For `publish`: the view directory inside the mount, to bind-mount into the pod.
  public var viewPath: String?
  /// For `publish`: the closure's Nix state layer (Nix's database and /nix/var/nix), to lay over
  /// the view; absent from daemons older than it.
  public var nixState: String?
  public var closure: [String]?
  /// For `ping`: where the store is mounted.
  public var mountpoint: String?
  public var views: [String: String]?
  /// For `fetch`: paths downloaded now (the rest of the closure was already local).
  public var fetched: Int?
  /// For `gc` and `fsck`: the report, a line each, as the command prints it.
  public var report: [String]?
  /// For `fsck`: whether the store is consistent.
  public var consistent: Bool?
  /// For `takeover`: the connection's record (its descriptor comes with the line).
  public var handover: Handover?
  /// For `status`.
  public var status: DaemonStatus?
  /// For `build`: the serve's answer; nil when no substituter builds.
  public var build: NixfsWire.BuildAnswer?

  public init(
    failure: ControlFailure? = nil, message: String? = nil, viewPath: String? = nil, closure: [String]? = nil,
    mountpoint: String? = nil, views: [String: String]? = nil, fetched: Int? = nil, report: [String]? = nil,
    consistent: Bool? = nil, handover: Handover? = nil, nixState: String? = nil
  ) {
    self.nixState = nixState
    self.handover = handover
    self.report = report
    self.consistent = consistent
    self.failure = failure
    self.message = message
    self.viewPath = viewPath
    self.closure = closure
    self.mountpoint = mountpoint
    self.views = views
    self.fetched = fetched
  }

  public init(status: DaemonStatus) { self.status = status }

  public static func failed(_ failure: ControlFailure, _ message: String) -> ControlResponse {
    ControlResponse(failure: failure, message: message)
  }
}

public struct ControlError: Error, CustomStringConvertible {
  public let socket: String
  public let reason: String
  public init(socket: String, reason: String) {
    self.socket = socket
    self.reason = reason
  }
  public var description: String { "control socket \(socket): \(reason)" }
}
