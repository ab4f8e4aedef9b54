import CUnix
import Foundation
import SystemCalls
import Threads

#if canImport(Glibc)
  import Glibc
#endif

/// pread until `count` bytes or end of file.
/// Fills `buffer` from `fd` at `offset`; false on a short read or an error.
func preadFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) -> Bool {
  var done = 0
  while done < buffer.count {
    guard let r = try? systemCall("pread", { pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done)) }),
      r > 0
    else { return false }
    done += r
  }
  return true
}

func preadFully(_ fd: Int32, count: Int, offset: UInt64) -> [UInt8]? {
  var done = 0
  var failed = false
  let out = [UInt8](unsafeUninitializedCapacity: count) { buf, n in
    while done < count {
      guard let r = try? systemCall("pread", { pread(fd, buf.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }),
        r > 0
      else {
        failed = true
        break
      }
      done += r
    }
    n = done
  }
  return failed ? nil : out
}

/// The errno of a failed write, or nil once every byte is written.
func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, offset: UInt64) -> Int32? {
  var done = 0
  while done < bytes.count {
    do throws(SystemCallError) {
      done += try systemCall("pwrite") { pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done)) }
    } catch {
      return error.errno
    }
  }
  return nil
}

/// Frees the disk blocks of a range without changing offsets (FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE): packs are never rewritten, so no live chunk ever moves under a reader.
func punchHole(_ fd: Int32, offset: UInt64, length: UInt64) {
  guard length > 0 else { return }
  _ = nixfs_fallocate(fd, 0x02 | 0x01, Int64(offset), Int64(length))
}

/// Starts writeback of a range without waiting (SYNC_FILE_RANGE_WRITE), so the fdatasync at
/// commit finds most of the data already on disk instead of flushing it all at once.
func startWriteback(_ fd: Int32, offset: UInt64, length: UInt64) {
  _ = nixfs_sync_file_range(fd, Int64(offset), Int64(length), 2)
}

func fsyncDirectory(_ path: String) {
  let fd = open(path, O_RDONLY | O_DIRECTORY)
  if fd >= 0 {
    fsync(fd)
    close(fd)
  }
}

/// An fdatasync running on another thread.
final class PendingSync: Sendable {
  /// The errno once done, 0 on success.
  private let result = Locked<Int32?>(nil)

  init(fd: Int32) {
    blockingPool.submit { [result] _ in
      let e = fdatasync(fd) != 0 ? errno : 0
      result.withLock { $0 = e }
      result.broadcast()
    }
  }

  /// Waits until done and returns the errno, 0 on success.
  func wait() -> Int32 { result.withLock(when: { $0 != nil }) { $0! } }
}
