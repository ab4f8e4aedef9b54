import CoreMetrics
import Foundation

/// Per-substituter request and byte counters, through swift-metrics (the executable picks the
/// backend). Every series exists from the start: one per configured substituter, kind and
/// outcome, so a rate over a quiet cache reads 0, not "no data".
public final class CacheMetrics: Sendable {
  /// What a request asked for, from the shape of its URL.
  enum Kind: String, CaseIterable {
    case cacheInfo = "cache_info", narinfo, nar, chunk, index, other

    init(url: String) {
      let path = url.split(separator: "?", maxSplits: 1).first.map(String.init) ?? url
      if path.hasSuffix("/nix-cache-info") {
        self = .cacheInfo
      } else if path.hasSuffix(".narinfo") {
        self = .narinfo
      } else if path.contains("/\(ChunkIndexWire.prefix)/chunks/") {
        self = .chunk
      } else if path.contains("/\(ChunkIndexWire.prefix)/manifests/") {
        self = .index
      } else if path.contains("/\(ChunkIndexWire.prefix)/") {
        self = .other
      } else {
        self = .nar
      }
    }
  }

  /// How an attempt ended: a 2xx, a miss (404, or 403 as S3 answers), another status, or no
  /// response at all (connection, stall, a body that failed its checks).
  enum Outcome: String, CaseIterable {
    case ok, notFound = "not_found", status, error

    init(_ result: Result<ResponseHead, CacheError>) {
      switch result {
      case .success(let head) where head.isSuccess: self = .ok
      case .success(let head) where head.status == 404 || head.status == 403: self = .notFound
      case .success: self = .status
      case .failure: self = .error
      }
    }
  }

  static let requestsName = "nixfs_substituter_requests_total"
  static let bytesName = "nixfs_substituter_received_bytes_total"
  static let fallThroughsName = "nixfs_substituter_fallthroughs_total"
  /// `# HELP` text of the series above, for the exporter.
  public static let help: [String: String] = [
    requestsName: "transfer attempts per substituter, by kind (narinfo, nar, chunk, ...) and outcome",
    bytesName: "body bytes received per substituter and kind, as sent (compressed)",
    fallThroughsName:
      "times a substituter failed a path or a chunk it offered and the next source was tried, by cause (a cache going bad shows here before pods notice)",
  ]

  private struct Series: Sendable {
    let base: String
    let requests: [Kind: [Outcome: Counter]]
    let bytes: [Kind: Counter]
    let fallThroughs: [FallThroughCause: Counter]
  }
  /// Longest base first, so a URL is counted against the most specific substituter.
  private let series: [Series]
  private let unmatched: Series

  /// `substituters`: (base URL requests start with, label as configured).
  init(substituters: [(base: String, label: String)]) {
    func make(_ base: String, _ label: String) -> Series {
      var requests: [Kind: [Outcome: Counter]] = [:]
      var bytes: [Kind: Counter] = [:]
      for kind in Kind.allCases {
        for outcome in Outcome.allCases {
          requests[kind, default: [:]][outcome] = Counter(
            label: Self.requestsName,
            dimensions: [("substituter", label), ("kind", kind.rawValue), ("outcome", outcome.rawValue)])
        }
        bytes[kind] = Counter(label: Self.bytesName, dimensions: [("substituter", label), ("kind", kind.rawValue)])
      }
      var fallThroughs: [FallThroughCause: Counter] = [:]
      for cause in FallThroughCause.allCases {
        fallThroughs[cause] = Counter(
          label: Self.fallThroughsName, dimensions: [("substituter", label), ("cause", cause.rawValue)])
      }
      return Series(base: base, requests: requests, bytes: bytes, fallThroughs: fallThroughs)
    }
    series = substituters.sorted { $0.base.count > $1.base.count }.map { make($0.base + "/", $0.label) }
    // NAR URLs a narinfo sent elsewhere (`narURLHosts`).
    unmatched = make("", "other")
  }

  func record(url: String, outcome: Result<ResponseHead, CacheError>, bytes: Int64) {
    let s = series.first { url.hasPrefix($0.base) } ?? unmatched
    let kind = Kind(url: url)
    s.requests[kind]?[Outcome(outcome)]?.increment()
    if bytes > 0 { s.bytes[kind]?.increment(by: bytes) }
  }

  func fellThrough(base: String, cause: FallThroughCause) {
    let s = series.first { $0.base == base + "/" } ?? unmatched
    s.fallThroughs[cause]?.increment()
  }
}

/// Why a substituter's answer was passed over for the next source's: the `cause` label of
/// `nixfs_substituter_fallthroughs_total`.
public enum FallThroughCause: String, CaseIterable, Sendable {
  case hashMismatch = "hash_mismatch"
  case sizeMismatch = "size_mismatch"
  /// A stream that does not decompress, or is not a valid NAR.
  case corrupt
  case httpStatus = "http_status"
  case unreachable
  case stalled
  /// A narinfo that is malformed, for another path, or not signed by a trusted key.
  case untrusted
  case indexRefused = "index_refused"
  case chunkRejected = "chunk_rejected"
  case other

  public init(_ error: CacheError) {
    switch error {
    case .hashMismatch: self = .hashMismatch
    case .sizeMismatch: self = .sizeMismatch
    case .decompression, .invalidNAR, .unsupportedCompression: self = .corrupt
    case .httpStatus, .s3Refused: self = .httpStatus
    case .network: self = .unreachable
    case .stalled: self = .stalled
    case .untrusted, .malformedNarInfo, .wrongStorePath, .refusedURL: self = .untrusted
    default: self = .other
    }
  }
}
