import Foundation

#if canImport(Glibc)
  import Glibc
#endif

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

/// An fdatasync running on another thread.
final class PendingSync: @unchecked Sendable {
  private let done = DispatchSemaphore(value: 0)
  // Written before `done` is signalled, read after it is waited for.
  private var error: Int32 = 0
  private var waited = false

  init(fd: Int32) {
    DispatchQueue.global(qos: .userInitiated).async { [self] in
      if fdatasync(fd) != 0 { error = errno }
      done.signal()
    }
  }

  /// Waits (once; later calls return at once) and returns the errno, 0 on success. One thread only.
  func wait() -> Int32 {
    if !waited {
      done.wait()
      waited = true
    }
    return error
  }
}
