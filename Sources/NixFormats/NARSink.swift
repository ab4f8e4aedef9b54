// The contract between whatever produces a NAR (a download, an upload, a local file) and whatever
// consumes it (the chunk store's ingest, a buffer): declared here, below both.

/// Where a NAR download delivers its decompressed bytes, in order, as they arrive.
///
/// Calls come from one of the client's transport threads (never a Swift concurrency thread, so a
/// sink may do blocking disk I/O) and never concurrently. Bytes are unverified until `fetchNAR`
/// returns: only then do they hash to the narinfo's NarHash. When `fetchNAR` throws, the sink must
/// discard everything it was given. `reset()` means "the download restarts from byte 0" (a server
/// that ignored a Range request, or a fall-through to another substituter): forget what you have.
public protocol NARSink: AnyObject, Sendable {
  func write(_ bytes: UnsafeRawBufferPointer) throws
  func reset() throws
  /// True for a sink that SHA-256-hashes every byte it is given anyway (the chunk store does, to
  /// check NarHash again at commit): the download then compares `writtenNARHash()` with NarHash
  /// instead of hashing the same bytes a second time. False by default.
  var computesNARHash: Bool { get }
  /// The SHA-256 of all bytes written since the last reset (only asked when `computesNARHash`).
  func writtenNARHash() -> NixHash?
  /// True for a sink that parses the NAR as strictly as `NARReader` (the chunk store's ingest
  /// does, to cut it into files): the download leaves the parse to it rather than parse every
  /// byte twice. Its parse failures are `NARError`s or carry one (`NARParseFailure`). The sink
  /// checks the NAR's end itself. False by default.
  var parsesNAR: Bool { get }
}

extension NARSink {
  public var computesNARHash: Bool { false }
  public func writtenNARHash() -> NixHash? { nil }
  public var parsesNAR: Bool { false }
}

/// An error that is, underneath, a NAR parse failure: a download reports it as an invalid NAR.
public protocol NARParseFailure: Error {
  var narError: NARError? { get }
}

