import CoreMetrics
import Foundation
import Prometheus

/// swift-metrics into Prometheus, with `# HELP` lines: the layers name their series through
/// swift-metrics, which carries no help text, and publish it in a table this factory reads.
/// Timers get buckets up to 300 s (a big NAR on a slow link takes minutes).
struct DescribedMetricsFactory: MetricsFactory {
  let registry: PrometheusCollectorRegistry
  let help: [String: String]
  private let fallback: PrometheusMetricsFactory

  static let durationBuckets: [Duration] = [
    .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
    .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    .seconds(30), .seconds(60), .seconds(120), .seconds(300),
  ]

  init(registry: PrometheusCollectorRegistry, help: [String: String]) {
    self.registry = registry
    self.help = help
    self.fallback = PrometheusMetricsFactory(registry: registry)
  }

  private func descriptor(_ label: String) -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: label, unitName: "", helpText: help[label] ?? "")
  }

  func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
    registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
  }

  func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
    registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
  }

  func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
    guard !aggregate else { return fallback.makeRecorder(label: label, dimensions: dimensions, aggregate: true) }
    return registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
  }

  func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
    registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
  }

  func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
    registry.makeDurationHistogram(descriptor: descriptor(label), labels: dimensions, buckets: Self.durationBuckets)
  }

  func destroyCounter(_ handler: any CounterHandler) { fallback.destroyCounter(handler) }
  func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) { fallback.destroyFloatingPointCounter(handler) }
  func destroyRecorder(_ handler: any RecorderHandler) { fallback.destroyRecorder(handler) }
  func destroyMeter(_ handler: any MeterHandler) { fallback.destroyMeter(handler) }
  func destroyTimer(_ handler: any TimerHandler) { fallback.destroyTimer(handler) }
}
