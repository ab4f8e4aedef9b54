// FUSE passthrough (Linux 6.9+): an open of a complete file is answered with a backing file, the
// file's plain bytes on the node's disk, and from then on the kernel reads and maps that file
// itself, with its page cache; the daemon sees no read of it. One backing file per content (so
// every path, view and pod with those bytes shares one page cache), made once from verified
// chunks, in the background, after a first open found none (that open and any other while one
// is open read through the daemon: the kernel holds each inode to one mode while it is open).
import ChunkStore
import Dispatch
import Foundation
import Logging
import Synchronization
import SystemCalls

#if canImport(Glibc)
  import Glibc
#endif

/// Where backing files live and when a file gets one.
public struct PassthroughOptions: Sendable {
  /// A directory on the node's own disk (`<state>/backing`).
  public var directory: String
  /// Smaller files are read through the daemon: their pages are few and the open costs more.
  public var minSize: UInt64 = 64 << 10
  /// Disk the backing files may take, least recently opened removed first (never while open).
  public var maxBytes: UInt64 = 8 << 30
  public init(directory: String) { self.directory = directory }
}

/// Registers backing files with the kernel: the FUSE adapter, on the connection's descriptor.
package protocol BackingRegistrar: Sendable {
  /// A backing id for the open regular file `fd`, or the errno why not.
  func register(_ fd: Int32) -> Result<Int32, SystemCallError>
  func unregister(_ id: Int32)
}

package final class Passthrough: Sendable {
  package enum Availability: Sendable, Equatable {
    /// Until the connection's INIT is answered and a first backing file registered.
    case unknown
    case on
    case off(String)
  }

  package struct State {
    var availability = Availability.unknown
    var registrar: (any BackingRegistrar)?
    /// Open passthrough-sized inodes (see `KernelViewState.opens`).
    var inodes: [UInt64: OpenInode] = [:]
    /// Registered backing ids by content, and how many open files use each.
    var backings: [ContentID: (id: Int32, opens: Int)] = [:]
    /// Backing files known to be on disk, and those being made.
    var made: Set<ContentID> = []
    var making: Set<ContentID> = []
    var diskBytes: UInt64 = 0
    var scanned = false
  }

  let options: PassthroughOptions
  let store: ChunkStore
  let logger: Logger
  package let state = Mutex(State())
  private let maker = DispatchQueue(label: "nixfs.passthrough.backing", qos: .utility)
  /// The file system's kernel-view journal, where opens are recorded for a successor.
  let journalSlot = Mutex<KernelViewJournal?>(nil)
  func journal() -> KernelViewJournal? { journalSlot.withLock { $0 } }

  init(options: PassthroughOptions, store: ChunkStore, logger: Logger) {
    self.options = options
    self.store = store
    self.logger = logger
  }

  package var availability: Availability { state.withLock { $0.availability } }

  func path(_ content: ContentID) -> String { "\(options.directory)/\(content.digest.hex)" }

  /// Called by the mount once the connection is set up: `negotiated` when its INIT reply (this
  /// daemon's or the first daemon's) asked for passthrough, else why it did not.
  package func connect(_ registrar: any BackingRegistrar, negotiated: Result<Void, PassthroughUnavailable>) {
    state.withLock { $0.registrar = registrar }
    switch negotiated {
    case .failure(let why): disable(why.reason)
    case .success:
      // A probe registration says at start whether this daemon may (CAP_SYS_ADMIN, a directory
      // on a file system that can back files), instead of on the first open.
      do {
        try FileManager.default.createDirectory(atPath: options.directory, withIntermediateDirectories: true)
        removeAbandoned()
        let probe = "\(options.directory)/.probe"
        let fd = Glibc.open(probe, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemCallError(call: "open \(probe)", errno: errno) }
        defer { close(fd) }
        switch registrar.register(fd) {
        case .success(let id):
          registrar.unregister(id)
          state.withLock { $0.availability = .on }
          FSMetrics.passthroughAvailable.record(1)
          logger.info(
            "FUSE passthrough on: complete files are read by the kernel from their backing files",
            metadata: ["directory": "\(options.directory)", "min_size": "\(options.minSize)", "max_bytes": "\(options.maxBytes)"])
        case .failure(let e):
          disable("the kernel refused a backing file: \(e) (needs CAP_SYS_ADMIN and a plain file system)")
        }
      } catch {
        disable("\(error)")
      }
    }
  }

  func disable(_ reason: String) {
    let first = state.withLock { s -> Bool in
      if case .off = s.availability { return false }
      s.availability = .off(reason)
      return true
    }
    FSMetrics.passthroughAvailable.record(0)
    if first { logger.warning("FUSE passthrough off; every read goes through the daemon", metadata: ["reason": "\(reason)"]) }
  }

  /// The previous daemon's open inodes and backing ids (a takeover, or a crash with a keeper).
  package func restore(_ opens: [UInt64: OpenInode]) {
    state.withLock { s in
      s.inodes = opens
      for o in opens.values {
        guard let id = o.backing, let c = o.content else { continue }
        s.backings[c, default: (id, 0)].opens += o.count
      }
    }
  }

  /// Tracked: the inode's mode matters to the kernel while it is open.
  func tracks(size: UInt64) -> Bool {
    guard size >= options.minSize else { return false }
    if case .off = availability { return state.withLock { !$0.inodes.isEmpty } }
    return true
  }

  /// How to answer an open of `ino`: the backing id to pass through to, or nil to read through
  /// the daemon. Counts the open until its release.
  func open(ino: UInt64, content: ContentID, size: UInt64) -> Int32? {
    guard tracks(size: size) else { return nil }
    var makeOne = false
    let id = state.withLock { s -> Int32? in
      if var o = s.inodes[ino], o.count > 0 {
        // The mode of the opens still open, whatever is on disk now.
        o.count += 1
        s.inodes[ino] = o
        if let id = o.backing, let c = o.content { s.backings[c]?.opens += 1; record(ino, id, c); return id }
        record(ino, nil, nil)
        return nil
      }
      var chosen: Int32?
      if s.availability == .on, let registrar = s.registrar {
        if let b = s.backings[content] {
          chosen = b.id
          s.backings[content]?.opens += 1
        } else if s.made.contains(content) || fileExists(content, &s) {
          let file = path(content)
          let fd = Glibc.open(file, O_RDONLY | O_CLOEXEC)
          if fd >= 0 {
            defer { close(fd) }
            switch registrar.register(fd) {
            case .success(let id):
              chosen = id
              s.backings[content] = (id, 1)
              // Least recently opened goes first when the budget is full.
              _ = futimens(fd, nil)
            case .failure(let e):
              if e.errno == EPERM || e.errno == ENOTTY || e.errno == EINVAL || e.errno == EOPNOTSUPP {
                s.availability = .off("the kernel refused a backing file: \(e)")
              }
              logger.warning("cannot register a backing file", metadata: ["file": "\(file)", "error": "\(e)"])
            }
          } else {
            s.made.remove(content)
            makeOne = true
          }
        } else {
          makeOne = true
        }
      }
      s.inodes[ino] = OpenInode(count: 1, backing: chosen, content: chosen == nil ? nil : content)
      record(ino, chosen, chosen == nil ? nil : content)
      return chosen
    }
    if id != nil { FSMetrics.passthroughOpens.increment() }
    if makeOne { make(content, size: size) }
    return id
  }

  private func record(_ ino: UInt64, _ id: Int32?, _ content: ContentID?) {
    if let e = journal()?.opened(ino, backing: id, content: content) {
      logger.warning("cannot journal an open for a successor", metadata: ["error": "\(e)"])
    }
  }

  private func fileExists(_ content: ContentID, _ s: inout State) -> Bool {
    var st = stat()
    guard stat(path(content), &st) == 0 else { return false }
    s.made.insert(content)
    return true
  }

  /// The kernel released one open of `ino`.
  func release(ino: UInt64) {
    let (closing, registrar) = state.withLock { s -> (Int32?, (any BackingRegistrar)?) in
      guard var o = s.inodes[ino] else { return (nil, nil) }
      o.count -= 1
      s.inodes[ino] = o.count > 0 ? o : nil
      if let e = journal()?.released(ino) {
        logger.warning("cannot journal a release for a successor", metadata: ["error": "\(e)"])
      }
      guard let c = o.content, var b = s.backings[c] else { return (nil, nil) }
      b.opens -= 1
      if b.opens > 0 {
        s.backings[c] = b
        return (nil, nil)
      }
      s.backings[c] = nil
      return (b.id, s.registrar)
    }
    if let closing, let registrar { registrar.unregister(closing) }
  }

  /// Makes the backing file of `content` in the background (one at a time, one per content): a
  /// partial file's chunks are not all here, and then there is none yet.
  func make(_ content: ContentID, size: UInt64) {
    let start = state.withLock { s -> Bool in
      guard !s.making.contains(content), !s.made.contains(content) else { return false }
      s.making.insert(content)
      return true
    }
    guard start else { return }
    maker.async { [self] in
      var made = false
      do {
        made = try makeNow(content, size: size)
      } catch {
        logger.warning("cannot make a backing file", metadata: ["content": "\(content)", "error": "\(error)"])
      }
      state.withLock { s in
        s.making.remove(content)
        if made {
          s.made.insert(content)
          s.diskBytes += size
        }
      }
      if made {
        FSMetrics.backingFilesMade.increment()
        evictOverBudget()
      }
    }
  }

  /// Writes, fsyncs and renames into place, so a crash leaves a whole verified copy or none.
  /// False when the content is not all here. (One `syncfs` for many files was tried: it flushes
  /// every dirty page of the file system, and on a busy node that stalled other writers for tens
  /// of seconds.)
  func makeNow(_ content: ContentID, size: UInt64) throws -> Bool {
    // A partial file (every open of one asks): one index query, not a read up to its first gap.
    if try !store.absentChunks(content: content, offset: 0, count: Int(size)).isEmpty { return false }
    try FileManager.default.createDirectory(atPath: options.directory, withIntermediateDirectories: true)
    let final = path(content)
    let temporary = "\(options.directory)/.new-\(content.digest.hex)-\(getpid())"
    let fd = Glibc.open(temporary, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o444)
    guard fd >= 0 else { throw SystemCallError(call: "open \(temporary)", errno: errno) }
    var keep = false
    defer {
      close(fd)
      if !keep { unlink(temporary) }
    }
    do {
      _ = try store.writeVerified(content: content, to: fd, path: temporary)
    } catch {
      if case .chunkAbsent = error { return false }
      throw error
    }
    guard fdatasync(fd) == 0 else { throw SystemCallError(call: "fdatasync \(temporary)", errno: errno) }
    guard rename(temporary, final) == 0 else { throw SystemCallError(call: "rename \(final)", errno: errno) }
    keep = true
    return true
  }

  /// Half-written backing files of daemons that are gone (a crash while making one).
  func removeAbandoned() {
    for name in (try? FileManager.default.contentsOfDirectory(atPath: options.directory)) ?? [] where name.hasPrefix(".new-") {
      guard let pid = Int32(name.split(separator: "-").last ?? ""), pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else {
        continue
      }
      unlink("\(options.directory)/\(name)")
    }
  }

  /// Writes the content's bytes, checked chunk by chunk, to a temporary file beside its place;
  /// nil when the content is not all here.
  func writeTemporary(_ content: ContentID) throws -> String? {
    try FileManager.default.createDirectory(atPath: options.directory, withIntermediateDirectories: true)
    let temporary = "\(options.directory)/.new-\(content.digest.hex)-\(getpid())"
    let fd = Glibc.open(temporary, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o444)
    guard fd >= 0 else { throw SystemCallError(call: "open \(temporary)", errno: errno) }
    defer { close(fd) }
    do {
      _ = try store.writeVerified(content: content, to: fd, path: temporary)
      return temporary
    } catch {
      unlink(temporary)
      if case .chunkAbsent = error { return nil }
      throw error
    }
  }

  /// Removes least recently opened backing files past the budget; never one that is registered.
  func evictOverBudget() {
    let (over, registered) = state.withLock { s -> (Bool, Set<String>) in
      (!s.scanned || s.diskBytes > options.maxBytes, Set(s.backings.keys.map { $0.digest.hex }))
    }
    guard over else { return }
    var files: [(name: String, size: UInt64, used: Int)] = []
    for name in (try? FileManager.default.contentsOfDirectory(atPath: options.directory)) ?? [] where !name.hasPrefix(".") {
      var st = stat()
      guard stat("\(options.directory)/\(name)", &st) == 0 else { continue }
      files.append((name, UInt64(st.st_size), st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec))
    }
    var total = files.reduce(0) { $0 + $1.size }
    var removed = 0
    for f in files.sorted(by: { $0.used < $1.used }) where total > options.maxBytes && !registered.contains(f.name) {
      guard unlink("\(options.directory)/\(f.name)") == 0 else { continue }
      total -= f.size
      removed += 1
      if let d = SHA256Digest(hex: f.name) { state.withLock { _ = $0.made.remove(ContentID(d)) } }
    }
    state.withLock { s in
      s.diskBytes = total
      s.scanned = true
    }
    FSMetrics.backingBytes.record(Int64(total))
    if removed > 0 { logger.info("removed backing files past the budget", metadata: ["files": "\(removed)", "bytes": "\(total)"]) }
  }

  /// Registered backing files and open passthrough inodes, for tests and status.
  package var counts: (backings: Int, inodes: Int, making: Int) {
    state.withLock { ($0.backings.count, $0.inodes.count, $0.making.count) }
  }
}

package struct PassthroughUnavailable: Error {
  package let reason: String
  package init(_ reason: String) { self.reason = reason }
}

extension StoreFileSystem {
  /// For `nixfs status`.
  package var passthroughStatus: String {
    guard let p = passthrough else { return "off: --passthrough off" }
    switch p.availability {
    case .unknown: return "starting"
    case .off(let why): return "off: \(why)"
    case .on:
      let c = p.counts
      return "on (\(c.backings) backing files registered, \(c.inodes) large files open, \(c.making) being made)"
    }
  }
}
