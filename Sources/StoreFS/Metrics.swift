import CoreMetrics
import NixFormats
import Foundation

/// What the daemon exports (`--metrics-listen`), through swift-metrics so the backend is the
/// executable's choice (Prometheus). Counters are created once: the hot path only increments.
final class FSMetrics: Sendable {
  static let operations = ["lookup", "getattr", "readlink", "open", "read", "opendir", "readdir", "statfs"]
  let requests: [String: Counter]
  let bytesServed = Counter(label: "nixfs_bytes_served_total")
  let pathsFetched = Counter(label: "nixfs_paths_fetched_total")
  /// Uncompressed NAR bytes ingested, and compressed bytes downloaded for them.
  static let narBytesFetched = Counter(label: "nixfs_nar_bytes_fetched_total")
  static let downloadBytes = Counter(label: "nixfs_download_bytes_total")
  /// Chunk-lazy paths: materialised from a verified chunk index, indexes refused (the NAR was
  /// fetched instead), chunks fetched and the bytes sent for them, chunks that did not verify.
  static let pathsFromIndex = Counter(label: "nixfs_paths_from_chunk_index_total")
  static let indexRefused = Counter(label: "nixfs_chunk_indexes_refused_total")
  static let chunksFetched = Counter(label: "nixfs_chunks_fetched_total")
  static let chunkBytesFetched = Counter(label: "nixfs_chunk_download_bytes_total")
  static let chunksRejected = Counter(label: "nixfs_chunks_rejected_total")
  /// The store against its budget, read at each scrape (`Daemon.refreshGauges`).
  static let storeBytes = Gauge(label: "nixfs_store_bytes")
  static let budgetBytes = Gauge(label: "nixfs_store_budget_bytes")
  static let pinnedPaths = Gauge(label: "nixfs_pinned_paths")
  static let partialPaths = Gauge(label: "nixfs_partial_paths")
  static let buildInfo = Gauge(label: "nixfs_build_info", dimensions: [("version", NixFSVersion.string)])
  let fetchSeconds = Timer(label: "nixfs_fetch_duration_seconds")
  /// Store path resolutions: served from the local store, or fetched first.
  let localHits = Counter(label: "nixfs_store_path_resolutions_total", dimensions: [("result", "local")])
  let fetchedMisses = Counter(label: "nixfs_store_path_resolutions_total", dimensions: [("result", "fetched")])
  let errorCounters: [String: Counter]
  let inflight = Meter(label: "nixfs_fetches_in_flight")

  static let causes = ["not_found", "fetch", "read", "index", "stale", "client"]

  init() {
    var r: [String: Counter] = [:]
    for op in Self.operations { r[op] = Counter(label: "nixfs_fuse_requests_total", dimensions: [("op", op)]) }
    requests = r
    var e: [String: Counter] = [:]
    for c in Self.causes { e[c] = Counter(label: "nixfs_errors_total", dimensions: [("cause", c)]) }
    errorCounters = e
  }

  func request(_ op: String) { requests[op]?.increment() }
  func error(_ cause: String) { errorCounters[cause]?.increment() }
}
