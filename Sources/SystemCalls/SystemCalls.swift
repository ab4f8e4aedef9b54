import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A system call that failed, by name and errno, as swift-system's `Errno` and NIOPosix's
/// `IOError` name them: "write: Broken pipe (errno 32)".
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
  public let call: String
  public let errno: Int32
  public init(call: String, errno: Int32) { (self.call, self.errno) = (call, errno) }
  public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// Runs a system call until it is not interrupted: its result when not negative, else the
/// `SystemCallError` naming `call`. The one place that loops on EINTR.
@inlinable
public func systemCall<T: BinaryInteger>(_ call: String, _ body: () -> T) throws(SystemCallError) -> T {
  while true {
    let r = body()
    if r >= 0 { return r }
    let e = errno
    if e != EINTR { throw SystemCallError(call: call, errno: e) }
  }
}

/// Writes all of `count` bytes at `base` to `fd`, however many `write`s it takes.
public func writeAll(_ fd: Int32, _ base: UnsafeRawPointer, _ count: Int, call: String = "write") throws(SystemCallError) {
  var done = 0
  while done < count {
    let n = try systemCall(call) { write(fd, base + done, count - done) }
    if n == 0 { throw SystemCallError(call: call, errno: EIO) }
    done += n
  }
}

/// Writes all of `data` to `fd`.
public func writeAll(_ fd: Int32, _ data: some ContiguousBytes, call: String = "write") throws(SystemCallError) {
  // ContiguousBytes' closure rethrows untyped: carry the error out.
  var failure: SystemCallError?
  data.withUnsafeBytes { buf in
    guard let base = buf.baseAddress else { return }
    do throws(SystemCallError) { try writeAll(fd, base, buf.count, call: call) } catch { failure = error }
  }
  if let failure { throw failure }
}
