import Foundation
import NixFormats

/// Everything the store can refuse or fail at, with the store path, chunk, file or offset involved.
/// `description` is one line a person can act on.
public enum ChunkStoreError: Error, Sendable, Hashable, CustomStringConvertible {
  case index(path: String, operation: String, message: String)
  case io(path: String, operation: String, errno: Int32)
  case locked(stateDir: String)
  /// `--state-dir` names a directory that holds other things than nixfs state.
  case foreignDirectory(path: String)
  case nar(storePath: String, error: NARError)
  case narHashMismatch(storePath: String, expected: String, actual: String)
  case narSizeMismatch(storePath: String, expected: UInt64, actual: UInt64)
  case alreadyComplete(storePath: String)
  case ingestInProgress(storePath: String)
  case ingestFinished(storePath: String)
  case notComplete(storePath: String)
  case contentNotFound(ContentID)
  case readPastEnd(content: ContentID, offset: UInt64, size: UInt64)
  /// Either may be unknown where the index lost the row that would name it.
  case chunkMissing(chunk: ChunkID?, content: ContentID?)
  case chunkCorrupt(chunk: ChunkID, pack: Int64, offset: UInt64, reason: String)
  case manifestCorrupt(storePath: String, reason: String)
  case pinned(storePath: String)
  /// A partial path's chunk that has not been fetched yet: the filesystem fetches it and reads again.
  case chunkAbsent(chunk: ChunkID, size: Int)
  /// Fetched bytes that are not the chunk they were asked for; never stored.
  case chunkRejected(chunk: ChunkID, source: String, reason: String)
  /// A chunk index that cannot stand for the path (inconsistent with itself or with the store).
  case indexRefused(storePath: String, reason: String)

  public var description: String {
    switch self {
    case .index(let path, let op, let msg): "index \(path): \(op) failed: \(msg)"
    case .io(let path, let op, let e): "\(path): \(op) failed: \(String(cString: strerror(e)))"
    case .foreignDirectory(let path):
      "\(path) is not a nixfs state directory (it holds other files); give nixfs a directory of its own"
    case .locked(let dir):
      "state directory \(dir) is locked by another nixfs process (stop the daemon or wait for it)"
    case .nar(let p, let e): "\(p): \(e)"
    case .narHashMismatch(let p, let expected, let actual):
      "\(p): NAR hash mismatch: expected \(expected), got \(actual) (corrupt download or wrong narinfo); nothing was stored"
    case .narSizeMismatch(let p, let expected, let actual):
      "\(p): NAR size mismatch: expected \(expected) bytes, got \(actual); nothing was stored"
    case .alreadyComplete(let p): "\(p) is already in the store"
    case .ingestInProgress(let p): "\(p) is already being ingested by this process"
    case .ingestFinished(let p): "\(p): ingest was already committed or aborted"
    case .notComplete(let p): "\(p) is not (completely) in the store; fetch it first"
    case .contentNotFound(let c): "file content \(c) is not in the store (evicted or never ingested)"
    case .readPastEnd(let c, let off, let size): "read at offset \(off) past the end of content \(c) (\(size) bytes)"
    case .chunkMissing(let chunk, let content):
      "\(chunk.map { "chunk \($0)" } ?? "a chunk") of \(content.map { "content \($0)" } ?? "a file") is missing from the index; run nixfs fsck --repair"
    case .chunkCorrupt(let chunk, let pack, let off, let why):
      "chunk \(chunk) in pack \(pack) at offset \(off) is corrupt (\(why)); run nixfs fsck --repair"
    case .manifestCorrupt(let p, let why): "\(p): stored manifest is corrupt (\(why)); run nixfs fsck --repair"
    case .pinned(let p): "\(p) is pinned and cannot be removed"
    case .chunkAbsent(let chunk, let size): "chunk \(chunk) (\(size) bytes) has not been fetched yet"
    case .chunkRejected(let chunk, let source, let why): "chunk \(chunk) from \(source) refused: \(why); it was not stored"
    case .indexRefused(let p, let why): "\(p): chunk index refused: \(why)"
    }
  }
}

extension ChunkStore {
  func wrap<T>(_ operation: String, _ body: () throws -> T) throws(ChunkStoreError) -> T {
    do { return try body() } catch let e as ChunkStoreError { throw e } catch {
      throw .index(path: indexPath, operation: operation, message: "\(error)")
    }
  }
}

extension ChunkStoreError: NARParseFailure {
  /// The parse failure underneath, for a download to report as an invalid NAR.
  public var narError: NARError? {
    if case .nar(_, let error) = self { error } else { nil }
  }
}
