internal import CZstd
import Foundation
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// A pthread readers–writer lock: reads share it, GC takes it exclusively while it deletes index
/// rows and punches holes, so no read can pread a range that is being freed.
final class RWLock: @unchecked Sendable {
  private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
  /// How many times the write side was taken: a reader that cached something under the read
  /// lock knows it is stale when this moved (GC, repair and sweeps all write).
  let writes = Atomic<UInt64>(0)
  init() { pthread_rwlock_init(lock, nil) }
  deinit {
    pthread_rwlock_destroy(lock)
    lock.deallocate()
  }
  func read<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_rdlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    return try body()
  }
  func write<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_rwlock_wrlock(lock)
    defer { pthread_rwlock_unlock(lock) }
    writes.add(1, ordering: .relaxed)
    return try body()
  }
}

extension NSLock {
  func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    lock()
    defer { unlock() }
    return try body()
  }
}

/// How a chunk's bytes are kept.
enum Codec: Int64 {
  case raw = 0
  case zstd = 1
  /// Known from a verified chunk index but not fetched yet (a partial path's): no bytes here.
  case absent = 2
}

/// Compresses with zstd; returns nil when compression saves less than 1/32 of the size, in which
/// case the chunk is stored raw (random or already-compressed data).
func compress(_ src: UnsafeRawBufferPointer, level: Int32, context: OpaquePointer) -> [UInt8]? {
  let bound = ZSTD_compressBound(src.count)
  let out = [UInt8](unsafeUninitializedCapacity: bound) { buf, n in
    let r = ZSTD_compressCCtx(context, buf.baseAddress, bound, src.baseAddress, src.count, level)
    n = ZSTD_isError(r) != 0 ? 0 : r
  }
  if out.isEmpty || out.count >= src.count - src.count / 32 { return nil }
  return out
}

func decompress(_ src: [UInt8], rawSize: Int) -> [UInt8]? {
  var ok = false
  let out = [UInt8](unsafeUninitializedCapacity: rawSize) { buf, n in
    let r = src.withUnsafeBytes { ZSTD_decompress(buf.baseAddress, rawSize, $0.baseAddress, src.count) }
    ok = ZSTD_isError(r) == 0 && r == rawSize
    n = ok ? rawSize : 0
  }
  return ok ? out : nil
}

/// pread until `count` bytes or end of file.
/// Fills `buffer` from `fd` at `offset`; false on a short read or an error.
func preadFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) -> Bool {
  var done = 0
  while done < buffer.count {
    let r = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
    if r < 0 && errno == EINTR { continue }
    if r <= 0 { return false }
    done += r
  }
  return true
}

func preadFully(_ fd: Int32, count: Int, offset: UInt64) -> [UInt8]? {
  var done = 0
  var failed = false
  let out = [UInt8](unsafeUninitializedCapacity: count) { buf, n in
    while done < count {
      let r = pread(fd, buf.baseAddress! + done, count - done, off_t(offset) + off_t(done))
      if r < 0 && errno == EINTR { continue }
      if r <= 0 {
        failed = true
        break
      }
      done += r
    }
    n = done
  }
  return failed ? nil : out
}

func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, offset: UInt64) -> Int32? {
  var done = 0
  while done < bytes.count {
    let r = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
    if r < 0 {
      if errno == EINTR { continue }
      return errno
    }
    done += r
  }
  return nil
}

/// Frees the disk blocks of a range without changing offsets (FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE): packs are never rewritten, so no live chunk ever moves under a reader.
func punchHole(_ fd: Int32, offset: UInt64, length: UInt64) {
  guard length > 0 else { return }
  _ = linuxFallocate(fd, 0x02 | 0x01, Int64(offset), Int64(length))
}

/// Starts writeback of a range without waiting (SYNC_FILE_RANGE_WRITE), so the fdatasync at
/// commit finds most of the data already on disk instead of flushing it all at once.
func startWriteback(_ fd: Int32, offset: UInt64, length: UInt64) {
  _ = linuxSyncFileRange(fd, Int64(offset), Int64(length), 2)
}

@_silgen_name("sync_file_range")
func linuxSyncFileRange(_ fd: Int32, _ offset: Int64, _ length: Int64, _ flags: UInt32) -> Int32

// Glibc declares fallocate only under _GNU_SOURCE, which Swift's Glibc module does not set.
@_silgen_name("fallocate")
func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32

func fsyncDirectory(_ path: String) {
  let fd = open(path, O_RDONLY | O_DIRECTORY)
  if fd >= 0 {
    fsync(fd)
    close(fd)
  }
}

/// Seconds since the epoch, for LRU.
func now() -> Int64 { Int64(Date().timeIntervalSince1970) }

/// The node's state directory, private to its owner: 0700, created so if missing and tightened
/// if an older version (or an operator) left it readable. Anyone who can open the lock file can
/// `flock` it and keep `nixfs mount`, `gc` and `fsck` from starting; the index names every path
/// the node holds. An existing directory is tightened only if it is empty or already holds nixfs
/// state: a mistaken `--state-dir /tmp` must not make /tmp private.
func preparePrivateDirectory(
  _ path: String,
  stateMarkers: [String] = [
    "lock", "index.sqlite", "narinfo-cache.sqlite", "packs", "csi-volumes.json", "control.sock", "uploads", "mnt", "kernel-view",
  ]
) throws(ChunkStoreError) {
  var existed = true
  var prefix = path.hasPrefix("/") ? "" : "."
  for part in path.split(separator: "/") {
    prefix += "/" + part
    if mkdir(prefix, 0o700) == 0 {
      if prefix.count >= path.count { existed = false }
    } else if errno != EEXIST {
      throw .io(path: prefix, operation: "mkdir", errno: errno)
    }
  }
  if existed && !stateMarkers.isEmpty {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
    guard entries.isEmpty || entries.contains(where: stateMarkers.contains) else {
      throw .foreignDirectory(path: path)
    }
  }
  guard chmod(path, 0o700) == 0 else { throw .io(path: path, operation: "chmod 0700", errno: errno) }
}

/// Creates `path` owner-only if missing and makes an existing one owner-only (an index or lock
/// file made by an older version was 0644). Files SQLite makes beside a database (-wal, -shm)
/// take the database's mode.
func makePrivateFile(_ path: String) throws(ChunkStoreError) {
  let fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
  guard fd >= 0 else { throw .io(path: path, operation: "open", errno: errno) }
  defer { close(fd) }
  guard fchmod(fd, 0o600) == 0 else { throw .io(path: path, operation: "chmod 0600", errno: errno) }
}

/// Runs blocking store work (fsync and SQL at commit, GC, fsck) on a thread of its own and awaits
/// it, so it never holds one of Swift concurrency's few threads: the filesystem's replies and the
/// serve's requests run there.
public func blockingWork<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
  try await withCheckedThrowingContinuation { continuation in
    let thread = Thread { continuation.resume(with: Result { try body() }) }
    thread.name = "nixfs-blocking"
    thread.start()
  }
}
