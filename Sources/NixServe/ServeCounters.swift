import BinaryCache
import ChunkStore
import Foundation
import Logging
import NixFormats
import Prometheus
import Synchronization

/// What the serve did, as Prometheus series on `/metrics` (every series present from the start).
public final class ServeCounters: Sendable {
  public let registry: PrometheusCollectorRegistry
  public let hits: Prometheus.Counter
  public let misses: Prometheus.Counter
  public let pulled: Prometheus.Counter
  public let upstreamBytes: Prometheus.Counter
  public let narBytesServed: Prometheus.Counter
  public let uploads: Prometheus.Counter
  public let chunksServed: Prometheus.Counter
  public let chunkBytesServed: Prometheus.Counter
  public let manifestsServed: Prometheus.Counter
  /// `POST nixfs/v1/chunks` answers (each counts its chunks in `chunksServed` too).
  public let chunkBatchesServed: Prometheus.Counter
  public let chunksBatched: Prometheus.Counter
  /// Bytes the chunk store keeps on disk, refreshed on every scrape.
  public let storedBytes: Gauge
  /// `nixfs_serve_builds_total{outcome}`: succeeded, failed, timeout, refused (no credential).
  public let builds: [String: Prometheus.Counter]
  public let buildsRunning: Gauge
  public let buildSeconds: Prometheus.Counter

  public init() {
    let registry = PrometheusCollectorRegistry()
    self.registry = registry
    func counter(_ name: String, _ help: String) -> Prometheus.Counter {
      registry.makeCounter(descriptor: MetricNameDescriptor(metricName: "nixfs_serve_\(name)", unitName: "", helpText: help))
    }
    hits = counter("narinfo_hits_total", "narinfo requests answered from the store")
    misses = counter("narinfo_misses_total", "narinfo requests for paths no upstream has")
    pulled = counter("paths_pulled_total", "paths pulled through from upstream, verified and stored")
    upstreamBytes = counter("upstream_bytes_total", "bytes downloaded from upstream (FileSize, else NarSize)")
    narBytesServed = counter("nar_served_bytes_total", "NAR bytes sent to clients")
    uploads = counter("uploads_total", "paths uploaded, verified and stored")
    chunksServed = counter("chunks_served_total", "chunks sent to clients")
    chunkBytesServed = counter("chunk_served_bytes_total", "chunk bytes sent to clients, as stored (compressed)")
    manifestsServed = counter("manifests_served_total", "chunk index documents sent to clients")
    chunkBatchesServed = counter("chunk_batches_served_total", "chunk batch answers (several chunks in one round trip)")
    chunksBatched = counter("batched_chunks_served_total", "chunks sent in batch answers (also in chunks_served_total)")
    storedBytes = registry.makeGauge(
      descriptor: MetricNameDescriptor(metricName: "nixfs_serve_store_bytes", unitName: "", helpText: "bytes the chunk store keeps on disk"))
    let buildsName = MetricNameDescriptor(
      metricName: "nixfs_serve_builds_total", unitName: "",
      helpText: "build requests that ended, by outcome (succeeded, failed, timeout, refused: no credential)")
    var builds: [String: Prometheus.Counter] = [:]
    for outcome in ["succeeded", "failed", "timeout", "refused"] {
      builds[outcome] = registry.makeCounter(descriptor: buildsName, labels: [("outcome", outcome)])
    }
    self.builds = builds
    buildsRunning = registry.makeGauge(
      descriptor: MetricNameDescriptor(metricName: "nixfs_serve_builds_running", unitName: "", helpText: "builds running now"))
    buildSeconds = counter("build_seconds_total", "seconds spent building (all builds, whatever their outcome)")
  }

  /// Prometheus text exposition.
  public func exposition() -> [UInt8] {
    var out: [UInt8] = []
    registry.emit(into: &out)
    return out
  }
}
