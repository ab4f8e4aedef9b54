import Foundation
import SQLiteDatabase

/// The index's connection and statements, from the wrapper shared with the narinfo cache; SQLite
/// failures come out as `ChunkStoreError.index`. One connection is used by one thread at a time
/// (the store hands them out from a pool), so it is opened unserialized.
typealias Database = SQLiteDatabase.Database<ChunkStoreError>
typealias Statement = SQLiteDatabase.Statement<ChunkStoreError>

extension ChunkStoreError: SQLiteFailure {
  public static func sqlite(path: String, operation: String, message: String) -> ChunkStoreError {
    .index(path: path, operation: operation, message: message)
  }
}

// Digests bind and read as 32-byte blobs.
extension SQLiteDatabase.Statement {
  func set(_ idx: Int32, _ name: some DigestName) { set(idx, name.digest) }
  func set(_ idx: Int32, _ d: SHA256Digest) {
    // Big-endian words laid out in order are the digest's bytes; no array needed.
    withUnsafeBytes(of: (d.w0.bigEndian, d.w1.bigEndian, d.w2.bigEndian, d.w3.bigEndian)) { set(idx, blobBytes: $0) }
  }
  func digest(_ col: Int32) -> SHA256Digest? {
    guard let b = blobBytes(col), b.count == 32 else { return nil }
    return SHA256Digest(bytes: b)
  }
  func chunkID(_ col: Int32) -> ChunkID? { digest(col).map(ChunkID.init) }
  func contentID(_ col: Int32) -> ContentID? { digest(col).map(ContentID.init) }
}

extension SHA256Digest: SQLValue {
  public func bind<F>(to statement: SQLiteDatabase.Statement<F>, at index: Int32) { statement.set(index, self) }
}
extension ChunkID: SQLValue {
  public func bind<F>(to statement: SQLiteDatabase.Statement<F>, at index: Int32) { statement.set(index, digest) }
}
extension ContentID: SQLValue {
  public func bind<F>(to statement: SQLiteDatabase.Statement<F>, at index: Int32) { statement.set(index, digest) }
}
