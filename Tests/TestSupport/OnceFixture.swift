/// A fixture made at most once per test process. A fixture that cannot be made fails each test
/// that asks for it, with the cause, and the other suites still run: a `try!` in a static
/// initialiser would kill the whole test process (signal 4) and every suite's report with it.
public final class OnceFixture<Value: Sendable>: Sendable {
  private let result: Result<Value, any Error>

  public init(_ make: () throws -> Value) {
    result = Result { try make() }
  }

  public func get() throws -> Value { try result.get() }
}

/// The error of type `E` that `body` threw; nil when it threw none or another kind.
public func caught<E: Error>(_ type: E.Type, _ body: () async throws -> Void) async -> E? {
  do {
    try await body()
    return nil
  } catch let e as E {
    return e
  } catch {
    return nil
  }
}
