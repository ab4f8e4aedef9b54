import Foundation
import Synchronization

/// A value behind a lock, shared by reference: with transport threads, and with the escaping
/// callbacks of a transfer (a `Mutex` itself cannot be captured by them).
final class Locked<Value>: Sendable {
  private let mutex: Mutex<Value>
  init(_ value: sending Value) { mutex = Mutex(value) }
  func withLock<R>(_ body: (inout sending Value) throws -> sending R) rethrows -> sending R {
    try mutex.withLock { try body(&$0) }
  }
}
