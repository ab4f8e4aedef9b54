import ArgumentParser
import Foundation
import Logging
import Synchronization

/// `--log-format`: the text lines of swift-log's stream handler, or one JSON object per line for
/// log collectors (Loki, Elasticsearch, Cloud Logging).
enum LogFormat: String, ExpressibleByArgument, CaseIterable, Sendable {
  case text, json
}

/// One JSON object per line on standard error: `time` (RFC 3339, UTC), `level`, `logger`,
/// `message`, and the metadata's keys as strings.
struct JSONLogHandler: LogHandler {
  let label: String
  var logLevel: Logger.Level = .info
  var metadata: Logger.Metadata = [:]
  var metadataProvider: Logger.MetadataProvider?

  /// One writer at a time, so lines from several threads never interleave.
  private static let output = Mutex<Void>(())

  init(label: String) { self.label = label }

  subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  func log(event: LogEvent) {
    var fields: [String: String] = [:]
    for (k, v) in metadata { fields[k] = "\(v)" }
    for (k, v) in metadataProvider?.get() ?? [:] { fields[k] = "\(v)" }
    for (k, v) in event.metadata ?? [:] { fields[k] = "\(v)" }
    let time = Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted))
    fields["time"] = time
    fields["level"] = event.level.rawValue
    fields["logger"] = label
    fields["message"] = "\(event.message)"
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    guard var line = try? encoder.encode(fields) else { return }
    line.append(0x0a)
    Self.output.withLock { _ in FileHandle.standardError.write(line) }
  }
}

func bootstrapLogging(level: String, label: String, format: LogFormat = .text) -> Logger {
  let lvl = Logger.Level(rawValue: level) ?? .info
  LoggingSystem.bootstrap { label in
    switch format {
    case .text:
      var h = StreamLogHandler.standardError(label: label)
      h.logLevel = lvl
      return h
    case .json:
      var h = JSONLogHandler(label: label)
      h.logLevel = lvl
      return h
    }
  }
  return Logger(label: label)
}

/// An unknown level is an error, not a silent `info`.
func checkLogLevel(_ level: String) throws {
  guard Logger.Level(rawValue: level) != nil else {
    throw ValidationError(
      "--log-level \(level): expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
  }
}
