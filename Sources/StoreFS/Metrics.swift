import CoreMetrics
import NixFormats
import Foundation

/// What the daemon exports (`--metrics-listen`), through swift-metrics so the backend is the
/// executable's choice (Prometheus). Counters are created once: the hot path only increments.
public final class FSMetrics: Sendable {
  package static let operations = ["lookup", "getattr", "readlink", "open", "read", "opendir", "readdir", "statfs"]
  package let requests: [String: Counter]
  package let bytesServed = Counter(label: "nixfs_served_bytes_total")
  package let pathsFetched = Counter(label: "nixfs_paths_fetched_total")
  /// Uncompressed NAR bytes ingested, and compressed bytes downloaded for them.
  package static let narBytesFetched = Counter(label: "nixfs_nar_fetched_bytes_total")
  package static let downloadBytes = Counter(label: "nixfs_download_bytes_total")
  /// Chunk-lazy paths: materialised from a verified chunk index, indexes refused (the NAR was
  /// fetched instead), chunks fetched and the bytes sent for them, chunks that did not verify.
  package static let pathsFromIndex = Counter(label: "nixfs_paths_from_chunk_index_total")
  package static let indexRefused = Counter(label: "nixfs_chunk_indexes_refused_total")
  package static let chunksFetched = Counter(label: "nixfs_chunks_fetched_total")
  package static let chunkBytesFetched = Counter(label: "nixfs_chunk_download_bytes_total")
  package static let chunksRejected = Counter(label: "nixfs_chunks_rejected_total")
  /// Batch requests (several chunks in one round trip).
  package static let chunkBatches = Counter(label: "nixfs_chunk_batches_total")
  /// The store against its budget, read at each scrape (`Daemon.refreshGauges`).
  package static let storeBytes = Gauge(label: "nixfs_store_bytes")
  package static let budgetBytes = Gauge(label: "nixfs_store_budget_bytes")
  package static let pinnedPaths = Gauge(label: "nixfs_pinned_paths")
  package static let partialPaths = Gauge(label: "nixfs_partial_paths")
  /// FUSE passthrough: on (1) or off (0) for this connection, opens passed through, backing
  /// files made, and the disk they take.
  package static let passthroughAvailable = Gauge(label: "nixfs_passthrough_available")
  package static let passthroughOpens = Counter(label: "nixfs_passthrough_opens_total")
  package static let backingFilesMade = Counter(label: "nixfs_passthrough_backing_files_made_total")
  package static let backingBytes = Gauge(label: "nixfs_passthrough_backing_bytes")
  package static let buildInfo = Gauge(
    label: "nixfs_build_info", dimensions: [("version", NixFSVersion.string), ("commit", NixFSVersion.commit)])
  package let fetchSeconds = Timer(label: "nixfs_fetch_duration_seconds")
  /// Store path resolutions: served from the local store, or fetched first.
  package let localHits = Counter(label: "nixfs_store_path_resolutions_total", dimensions: [("result", "local")])
  package let fetchedMisses = Counter(label: "nixfs_store_path_resolutions_total", dimensions: [("result", "fetched")])
  package let errorCounters: [String: Counter]
  package let inflight = Meter(label: "nixfs_fetches_in_flight")

  package static let causes = ["not_found", "fetch", "read", "index", "stale", "client"]

  /// `# HELP` text for every series above, for the exporter (swift-metrics carries none).
  public static let help: [String: String] = [
    "nixfs_fuse_requests_total": "FUSE requests answered, by operation",
    "nixfs_served_bytes_total": "bytes returned to readers",
    "nixfs_paths_fetched_total": "store paths fetched from substituters and verified",
    "nixfs_nar_fetched_bytes_total": "uncompressed NAR bytes ingested",
    "nixfs_download_bytes_total": "compressed bytes downloaded for ingested NARs (FileSize, else NarSize)",
    "nixfs_paths_from_chunk_index_total": "paths registered from a verified chunk index, without their NAR",
    "nixfs_chunk_indexes_refused_total": "chunk indexes refused (untrusted, inconsistent, unreachable): the NAR was fetched instead",
    "nixfs_chunks_fetched_total": "chunks fetched for reads of partial paths, verified",
    "nixfs_chunk_download_bytes_total": "bytes downloaded for fetched chunks, as sent (compressed)",
    "nixfs_chunks_rejected_total": "fetched chunks that did not verify and were discarded",
    "nixfs_chunk_batches_total": "chunk batch requests (several chunks in one round trip; their chunks count in nixfs_chunks_fetched_total)",
    "nixfs_store_bytes": "bytes the chunk store keeps on disk",
    "nixfs_store_budget_bytes": "the store's disk budget (--max-size), 0 for none",
    "nixfs_pinned_paths": "store paths pinned by published views",
    "nixfs_partial_paths": "store paths registered from a chunk index and not yet complete",
    "nixfs_passthrough_available": "1 when complete files are passed through to backing files (FUSE passthrough), 0 when every read goes through the daemon",
    "nixfs_passthrough_opens_total": "opens answered with passthrough to a backing file",
    "nixfs_passthrough_backing_files_made_total": "backing files made from verified chunks",
    "nixfs_passthrough_backing_bytes": "disk the backing files take (their own budget, --passthrough-max-size)",
    "nixfs_build_info": "the running build, 1, labelled with its version and commit",
    "nixfs_fetch_duration_seconds": "time to fetch, verify and ingest one store path, successful fetches only",
    "nixfs_store_path_resolutions_total": "store path lookups, served from the local store or fetched first",
    "nixfs_errors_total": "requests answered with an error, by cause",
    "nixfs_fetches_in_flight": "store path fetches running now",
  ]

  package init() {
    // Static series are created on first use: touch them so every series is there from the start.
    _ = [Self.narBytesFetched, Self.downloadBytes, Self.pathsFromIndex, Self.indexRefused, Self.chunksFetched, Self.chunkBytesFetched, Self.chunksRejected, Self.chunkBatches]
    _ = [Self.storeBytes, Self.budgetBytes, Self.pinnedPaths, Self.partialPaths, Self.buildInfo, Self.passthroughAvailable, Self.backingBytes]
    _ = [Self.passthroughOpens, Self.backingFilesMade]
    var r: [String: Counter] = [:]
    for op in Self.operations { r[op] = Counter(label: "nixfs_fuse_requests_total", dimensions: [("op", op)]) }
    requests = r
    var e: [String: Counter] = [:]
    for c in Self.causes { e[c] = Counter(label: "nixfs_errors_total", dimensions: [("cause", c)]) }
    errorCounters = e
  }

  package func request(_ op: String) { requests[op]?.increment() }
  package func error(_ cause: String) { errorCounters[cause]?.increment() }
}
