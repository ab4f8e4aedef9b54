import Foundation
import NixFormats
import Synchronization

/// A sink that promised its NAR hash did not report one.
struct MissingSinkHash: Error, CustomStringConvertible {
  var description: String { "the sink computes the NAR hash but reported none" }
}

/// Collects a NAR in memory (tests, small paths).
public final class NARBuffer: NARSink, Sendable {
  private let state = Mutex<(storage: [UInt8], resets: Int)>(([], 0))

  public init() {}

  public var bytes: [UInt8] { state.withLock { $0.storage } }
  /// How many times the download restarted from zero.
  public var resets: Int { state.withLock { $0.resets } }

  public func write(_ bytes: UnsafeRawBufferPointer) throws {
    state.withLock { $0.storage.append(contentsOf: bytes) }
  }

  public func reset() throws {
    state.withLock {
      $0.storage.removeAll(keepingCapacity: true)
      $0.resets += 1
    }
  }
}

/// Adapts a NARSink into NAR events, for consumers that want the tree rather than the bytes.
/// `handler` gets `nil` on reset: drop what was built and start over.
public final class NAREventSink: NARSink, @unchecked Sendable {
  private var reader: NARReader
  private let totalSize: UInt64?
  private let handler: (NAREvent?) throws -> Void

  public init(totalSize: UInt64? = nil, _ handler: @escaping (NAREvent?) throws -> Void) {
    self.totalSize = totalSize
    self.reader = NARReader(totalSize: totalSize)
    self.handler = handler
  }

  public func write(_ bytes: UnsafeRawBufferPointer) throws {
    try reader.feed(bytes) { try handler($0) }
  }

  public func reset() throws {
    reader = NARReader(totalSize: totalSize)
    try handler(nil)
  }
}
