import CoreMetrics
import GRPCCore

/// What the CSI plugin exports (`nixfs csi --metrics-listen`): publish and unpublish calls by
/// outcome, and how long a publish took. Every series exists from the start.
public final class CSIMetrics: Sendable {
  public enum Method: String, CaseIterable, Sendable {
    case publish = "NodePublishVolume", unpublish = "NodeUnpublishVolume"
  }

  /// gRPC status names, as the standard gRPC exporters label them.
  static let codes = [
    "OK", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "Unavailable", "DeadlineExceeded",
    "Internal", "Unknown",
  ]

  public static let help: [String: String] = [
    "nixfs_csi_requests_total": "CSI node calls answered, by method and gRPC status code",
    "nixfs_csi_publish_duration_seconds": "time to answer NodePublishVolume (evaluation, closure, view, bind mount), by outcome",
    "nixfs_csi_volumes": "volumes published on this node, by access (read_only: a bind of the view; read_write: an overlay with an upper of its own)",
  ]

  private let requests: [Method: [String: Counter]]
  private let publishSeconds: [Bool: Timer]
  private let volumeGauges: [Bool: Gauge]

  public init() {
    var r: [Method: [String: Counter]] = [:]
    for m in Method.allCases {
      for c in Self.codes {
        r[m, default: [:]][c] = Counter(label: "nixfs_csi_requests_total", dimensions: [("method", m.rawValue), ("code", c)])
      }
    }
    requests = r
    publishSeconds = [
      true: Timer(label: "nixfs_csi_publish_duration_seconds", dimensions: [("outcome", "ok")]),
      false: Timer(label: "nixfs_csi_publish_duration_seconds", dimensions: [("outcome", "error")]),
    ]
    volumeGauges = [
      true: Gauge(label: "nixfs_csi_volumes", dimensions: [("access", "read_only")]),
      false: Gauge(label: "nixfs_csi_volumes", dimensions: [("access", "read_write")]),
    ]
    volumeGauges.values.forEach { $0.record(0) }
  }

  func volumes(_ records: [VolumeRecord]) {
    let readOnly = records.filter(\.isReadOnly).count
    volumeGauges[true]?.record(readOnly)
    volumeGauges[false]?.record(records.count - readOnly)
  }

  /// The status name of what a call threw (nil: it succeeded).
  static func codeName(_ error: (any Error)?) -> String {
    guard let error else { return "OK" }
    guard let rpc = error as? RPCError else { return "Unknown" }
    switch rpc.code {
    case .invalidArgument: return "InvalidArgument"
    case .notFound: return "NotFound"
    case .alreadyExists: return "AlreadyExists"
    case .failedPrecondition: return "FailedPrecondition"
    case .unavailable: return "Unavailable"
    case .deadlineExceeded: return "DeadlineExceeded"
    case .internalError: return "Internal"
    default: return "Unknown"
    }
  }

  func record(_ method: Method, error: (any Error)?, seconds: Double) {
    requests[method]?[Self.codeName(error)]?.increment()
    if method == .publish { publishSeconds[error == nil]?.recordNanoseconds(Int64(seconds * 1e9)) }
  }
}
