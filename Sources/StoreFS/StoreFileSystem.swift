import ChunkStore
import Foundation
import Logging
import NodeControl
import NixFormats
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Tunables of the mounted store.
public struct StoreFSOptions: Sendable {
  /// Kernel cache lifetime of names and attributes: the store is immutable, so effectively forever.
  public var entryTimeout: Double = 365 * 86400
  /// Kernel and daemon cache lifetime of "no such store path".
  public var negativeTimeout: Double = 30
  /// Tree nodes of store paths kept in memory (directory structure only, not file contents).
  public var treeCacheNodes: Int = 2_000_000
  public var maxThreads: Int = 16
  /// Where `statfs` reports disk space from (the state directory).
  public var statfsPath: String = "/"
  /// Store directory the mount stands for (symlinks in views point into it).
  public var storeDir: String = StorePath.defaultStoreDir
  /// Mount over a live mount or a non-empty directory (`--allow-non-empty`); refused otherwise.
  public var allowNonEmpty = false
  /// Materialise paths from signed chunk indexes where offered (chunk-lazy), else whole NARs.
  public var useChunkIndex = true
  /// How long after a publish the chunks its pod reads count as its startup profile (0: off).
  public var startupProfileSeconds: Double = 10
  public init() {}
}

/// A CSI view: `store/` lists exactly `closure`; `var/result` points at `result`.
public struct StoreView: Sendable {
  public let id: String
  public let closure: [StorePath]
  public let result: StorePath
  public init(id: String, closure: [StorePath], result: StorePath) {
    self.id = id
    self.closure = closure.sorted()
    self.result = result
  }
}

/// The read-only, lazily materialised /nix/store served over FUSE.
public final class StoreFileSystem: @unchecked Sendable {
  public static let viewsDirName = ".views"

  package let store: ChunkStore
  package let materialiser: any Materialiser
  package let options: StoreFSOptions
  package let logger: Logger
  package let state: Mutex<State>
  package let metrics = FSMetrics()
  /// What the kernel's node ids mean, for the next daemon on this connection (set by the mount).
  package var journal: KernelViewJournal?
  package let readPattern = ReadPattern()
  package let startups = StartupRecorder()

  package struct InstanceKey: Hashable {
    let namespace: UInt32  // 0: the store directory; n: view number n
    let path: StorePath
  }

  package struct FileInfo {
    var content: ContentID
    var size: UInt64
    var path: StorePath
  }

  package struct RegisteredView {
    let view: StoreView
    let number: UInt32
    let members: Set<StorePath>
  }

  package struct State {
    var instances: [UInt32: InstanceKey] = [:]
    var instanceIDs: [InstanceKey: UInt32] = [:]
    var nextInstance: UInt32 = 1
    var trees: [StorePath: (tree: Manifest, used: UInt64)] = [:]
    var treeNodes = 0
    var clock: UInt64 = 0
    /// Files the kernel knows, by inode number less the executable bit.
    var files: [UInt64: FileInfo] = [:]
    var lookups: [UInt64: UInt64] = [:]  // nlookup by inode (files and nodes)
    var negative: [StorePath: Date] = [:]
    var evictionsSeen: UInt64 = 0
    var inflight: [StorePath: Task<Void, any Error>] = [:]
    var views: [String: RegisteredView] = [:]
    var viewNumbers: [UInt32: String] = [:]
    var nextView: UInt32 = 1
    var openHandles: [UInt64: StorePath] = [:]
    var dirListings: [UInt64: [DirectoryEntry]] = [:]
    var nextHandle: UInt64 = 1
  }

  public init(store: ChunkStore, materialiser: any Materialiser, options: StoreFSOptions = .init(), logger: Logger) {
    self.store = store
    self.materialiser = materialiser
    self.options = options
    self.logger = logger
    self.state = Mutex(State())
  }

  /// Loads what the previous daemon told the kernel, so its node ids keep their meaning.
  package func restore(_ view: KernelViewState) {
    state.withLock { s in
      for (id, i) in view.instances {
        let key = InstanceKey(namespace: i.namespace, path: i.path)
        s.instances[id] = key
        s.instanceIDs[key] = id
        s.nextInstance = max(s.nextInstance, id + 1)
      }
      for (number, f) in view.files { s.files[number] = FileInfo(content: f.content, size: f.size, path: f.path) }
      for (number, v) in view.views {
        s.views[v.id] = RegisteredView(view: v, number: number, members: Set(v.closure))
        s.viewNumbers[number] = v.id
        s.nextView = max(s.nextView, number + 1)
      }
      // Handles the kernel still holds from before must never be mistaken for new ones.
      s.nextHandle = view.generation << 40 + 1
    }
  }

  // MARK: Views (for the CSI node service)

  /// Adds a view, or updates it in place: a view keeps its number, hence its inodes, so pods
  /// bound to it keep working when the CSI plugin publishes it again (retries, restarts).
  public func addView(_ view: StoreView) {
    state.withLock { s in
      let number: UInt32
      if let old = s.views[view.id] {
        number = old.number
      } else {
        number = s.nextView
        s.nextView += 1
      }
      s.views[view.id] = RegisteredView(view: view, number: number, members: Set(view.closure))
      s.viewNumbers[number] = view.id
      journal?.view(number, view)
    }
  }

  public func removeView(id: String) {
    state.withLock { s in
      guard let old = s.views.removeValue(forKey: id) else { return }
      s.viewNumbers[old.number] = nil
      journal?.viewRemoved(old.number)
      // Its tree instances go too: a view's number is never reused, so nothing can refer to them.
      for (key, instance) in s.instanceIDs where key.namespace == old.number {
        s.instanceIDs[key] = nil
        s.instances[instance] = nil
      }
    }
  }

  public func viewIDs() -> [String] { state.withLock { Array($0.views.keys).sorted() } }

  /// Store paths being fetched now.
  public func fetchesInFlight() -> [StorePath] { state.withLock { Array($0.inflight.keys).sorted() } }

  // MARK: Trees and materialisation

  package func count(_ op: String) { metrics.request(op) }

  package func cachedTree(_ path: StorePath) -> Manifest? {
    let evictions = store.evictions
    return state.withLock { s in
      // GC evicted something since the trees were cached: forget them, the index is the truth.
      if evictions != s.evictionsSeen {
        s.evictionsSeen = evictions
        s.trees.removeAll()
        s.treeNodes = 0
      }
      guard var entry = s.trees[path] else { return nil }
      s.clock += 1
      entry.used = s.clock
      s.trees[path] = entry
      return entry.tree
    }
  }

  package func remember(_ path: StorePath, _ tree: Manifest) {
    state.withLock { s in
      s.clock += 1
      if let old = s.trees.updateValue((tree, s.clock), forKey: path) { s.treeNodes -= old.tree.nodes.count }
      s.treeNodes += tree.nodes.count
      if s.treeNodes > options.treeCacheNodes {
        // Drop least recently used trees down to 90% of the budget; they reload from the index.
        for v in s.trees.sorted(by: { $0.value.used < $1.value.used }) where s.treeNodes > options.treeCacheNodes * 9 / 10 {
          if v.key == path { continue }
          s.trees[v.key] = nil
          s.treeNodes -= v.value.tree.nodes.count
        }
      }
    }
  }

  /// The tree of `path` if it is here (complete, or partial: chunks come as read), without any network.
  package func localTree(_ path: StorePath) -> Manifest? {
    if let t = cachedTree(path) { return t }
    do {
      guard let t = try store.servableTree(of: path) else { return nil }
      remember(path, t)
      return t
    } catch {
      logger.error("cannot read the index", metadata: ["path": "\(path)", "error": "\(error)"])
      return nil
    }
  }

  /// Calls `body` with the tree of `path`, materialising it first if needed. `body` runs on the
  /// calling (FUSE worker) thread when the path is local, otherwise on a task once it is: the
  /// worker never waits for the network.
  /// `resolution` marks a store path lookup, counted in the local/fetched hit-ratio metric.
  package func withTree(
    _ path: StorePath, _ req: any Replier, resolution: Bool = false, _ body: @escaping @Sendable (Manifest) -> Void
  ) {
    if let t = localTree(path) {
      if resolution { metrics.localHits.increment() }
      body(t)
      return
    }
    if resolution { metrics.fetchedMisses.increment() }
    let negative = state.withLock { s -> Bool in
      if let until = s.negative[path] {
        if until > Date() { return true }
        s.negative[path] = nil
      }
      return false
    }
    if negative {
      replyNegative(req)
      return
    }
    let task = materialisation(of: path)
    Task {
      let start = ContinuousClock.now
      do {
        try await task.value
        guard let t = self.localTree(path) else {
          self.logger.error("materialised path is not in the store", metadata: ["path": "\(path)"])
          self.replyError(req, EIO, cause: "index")
          return
        }
        self.logger.info(
          "materialised", metadata: ["path": "\(path)", "seconds": "\((ContinuousClock.now - start).seconds)"])
        body(t)
      } catch MaterialiseFailure.notFound(let why) {
        self.logger.info("not in any cache", metadata: ["path": "\(path)", "reason": "\(why)"])
        self.metrics.error("not_found")
        self.replyNegative(req)
      } catch {
        self.logger.error("cannot materialise", metadata: ["path": "\(path)", "error": "\(error)"])
        self.replyError(req, EIO, cause: "fetch")
      }
    }
  }

  /// The one download of `path`: lookups and prefetches of a path in flight share it. When it
  /// ends it leaves the in-flight table (a path no cache has is remembered as missing for a while).
  package func materialisation(of path: StorePath) -> Task<Void, any Error> {
    state.withLock { s -> Task<Void, any Error> in
      if let t = s.inflight[path] { return t }
      let materialiser = self.materialiser
      let metrics = self.metrics
      // Its end takes the state lock, held here until the task is in the table.
      let t = Task<Void, any Error> {
        metrics.inflight.increment()
        defer { metrics.inflight.decrement() }
        let start = ContinuousClock.now
        do {
          try await materialiser.materialise(path, whole: false)
        } catch {
          self.finished(path, negative: { if case MaterialiseFailure.notFound = error { true } else { false } }())
          throw error
        }
        self.finished(path)
        metrics.fetchSeconds.recordNanoseconds(Int64((ContinuousClock.now - start).seconds * 1e9))
        metrics.pathsFetched.increment()
      }
      s.inflight[path] = t
      return t
    }
  }

  /// Materialises `paths` now (`nixfs fetch` through a running daemon), `parallel` at a time,
  /// sharing downloads with concurrent lookups. Returns how many were fetched.
  /// Partial paths are completed (their missing chunks fetched).
  public func prefetch(_ paths: [StorePath], parallel: Int) async throws -> Int {
    let missing = paths.filter { !store.isComplete($0) }
    try await inParallel(missing, limit: parallel) { p in
      try await self.materialisation(of: p).value
      try await self.materialiser.materialise(p, whole: true)
    }
    return missing.count
  }

  /// Before a pod starts: the trees of `paths` from their chunk indexes, `parallel` at a time and
  /// for at most `seconds`, so the pod's first lookups are local. No NAR is downloaded here.
  public func warm(_ paths: [StorePath], parallel: Int = 8, seconds: Double = 20) async {
    let missing = paths.filter { localTree($0) == nil }
    guard !missing.isEmpty else { return }
    let materialiser = self.materialiser
    await withTaskGroup(of: Void.self) { group in
      group.addTask { try? await inParallel(missing, limit: parallel) { p in _ = await materialiser.materialiseFromIndex(p) } }
      group.addTask { try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9)) }
      await group.next()
      group.cancelAll()
    }
  }

  /// A pod of `root` is about to start: prefetch the chunks its path's startup profile names
  /// (those a partial path here lacks), and record the chunks it fetches in its first seconds,
  /// to be reported to the chunk source. Both in the background.
  public func startPod(root: StorePath, closure: [StorePath]) {
    let seconds = options.startupProfileSeconds
    guard seconds > 0 else { return }
    let window = startups.open(root: root, members: Set(closure))
    let (materialiser, store, logger) = (self.materialiser, self.store, self.logger)
    Task {
      let profile = await materialiser.startupProfile(of: root)
      guard !profile.isEmpty else { return }
      let absent = store.absentAmong(profile)
      logger.info(
        "prefetching a startup profile", metadata: ["path": "\(root)", "chunks": "\(profile.count)", "absent": "\(absent.count)"])
      do { try await materialiser.fetchChunks(absent) } catch {
        logger.warning("startup profile prefetch incomplete", metadata: ["path": "\(root)", "error": "\(error)"])
      }
    }
    Task {
      try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
      let read = startups.close(window)
      if !read.isEmpty { await materialiser.reportStartupProfile(read, of: root) }
    }
  }

  package func finished(_ path: StorePath, negative: Bool = false) {
    state.withLock { s in
      s.inflight[path] = nil
      if negative { s.negative[path] = Date().addingTimeInterval(options.negativeTimeout) }
    }
  }

  package func instance(_ namespace: UInt32, _ path: StorePath) -> UInt32 {
    let (id, isNew) = state.withLock { s -> (UInt32, Bool) in
      let key = InstanceKey(namespace: namespace, path: path)
      if let id = s.instanceIDs[key] { return (id, false) }
      let id = s.nextInstance
      s.nextInstance += 1
      s.instanceIDs[key] = id
      s.instances[id] = key
      return (id, true)
    }
    // Journalled before the kernel learns the number, but outside the lock: lookups of other
    // paths must not queue behind a write.
    if isNew { journal?.instance(id, namespace: namespace, path: path) }
    return id
  }


  // MARK: Attributes

  package func attributes(ino: UInt64, of kind: Manifest.Kind) -> stat {
    var st = stat()
    st.st_ino = UInt(ino)
    st.st_uid = 0
    st.st_gid = 0
    st.st_mtim = timespec(tv_sec: 1, tv_nsec: 0)
    st.st_atim = st.st_mtim
    st.st_ctim = st.st_mtim
    st.st_blksize = 65536
    switch kind {
    case .directory:
      st.st_mode = S_IFDIR | 0o555
      st.st_nlink = 2
      st.st_size = 4096
      st.st_blocks = 8
    case .regular(_, let size, let executable):
      st.st_mode = S_IFREG | (executable ? 0o555 : 0o444)
      st.st_nlink = 1
      st.st_size = Int(size)
      st.st_blocks = Int((size + 511) / 512)
    case .symlink(let target):
      st.st_mode = S_IFLNK | 0o777
      st.st_nlink = 1
      st.st_size = target.count
    }
    return st
  }

  package func directoryAttributes(ino: UInt64) -> stat {
    attributes(ino: ino, of: .directory(firstChild: 0, childCount: 0))
  }

  /// The inode number of a file content: 62 bits of its digest, so every copy of the same bytes
  /// anywhere in the mount is one inode. On the (astronomically rare) clash with another content
  /// the kernel still knows, the file falls back to a per-path inode: correct, just not shared.
  package func fileInode(path: StorePath, instance: UInt32, index: Int32, content: ContentID, size: UInt64, executable: Bool)
    -> UInt64
  {
    let number = Inode.fileNumber(content)
    let (clash, changed) = state.withLock { s -> (Bool, Bool) in
      if let known = s.files[number] {
        if known.content != content { return (true, false) }
        if known.path == path { return (false, false) }
      }
      // The latest path to show this content is the one to pin and re-fetch on open.
      s.files[number] = FileInfo(content: content, size: size, path: path)
      return (false, true)
    }
    // Before the reply, outside the lock (as in `instance`).
    if changed { journal?.file(number, content: content, size: size, path: path) }
    return clash ? Inode.node(instance: instance, index: index) : Inode.file(content: number, executable: executable)
  }

  /// The inode of node `index` of `tree` as seen through `instance`, and its attributes.
  package func entry(_ tree: Manifest, path: StorePath, instance: UInt32, index: Int32) -> (UInt64, stat) {
    let kind = tree.nodes[Int(index)].kind
    let ino: UInt64
    if case .regular(let content, let size, let executable) = kind {
      ino = fileInode(path: path, instance: instance, index: index, content: content, size: size, executable: executable)
    } else {
      ino = Inode.node(instance: instance, index: index)
    }
    return (ino, attributes(ino: ino, of: kind))
  }

  // MARK: Replies

  package func replyEntry(_ req: any Replier, ino: UInt64, attr: stat) {
    if ino != Inode.root && Inode.decode(ino) != .invalid {
      if case .virtual = Inode.decode(ino) {} else {
        state.withLock { $0.lookups[ino, default: 0] += 1 }
      }
    }
    if !req.entry(ino: ino, attr: attr, timeout: options.entryTimeout) {
      // The kernel did not take the reference (interrupted): undo the count.
      forget(ino, 1)
    }
  }

  /// "No such entry", cached by the kernel for the negative timeout.
  package func replyNegative(_ req: any Replier) {
    req.entry(ino: 0, attr: stat(), timeout: options.negativeTimeout)
  }

  package func replyError(_ req: any Replier, _ errno: Int32, cause: String) {
    metrics.error(cause)
    req.error(errno)
  }

  package func replyAttr(_ req: any Replier, _ st: stat) {
    req.attributes(st, timeout: options.entryTimeout)
  }

  package func forget(_ ino: UInt64, _ n: UInt64) {
    state.withLock { s in
      guard let c = s.lookups[ino] else { return }
      if c <= n {
        s.lookups[ino] = nil
        if case .file(let content, _) = Inode.decode(ino) {
          // The other executable-bit twin may still be known to the kernel.
          if s.lookups[ino ^ 1] == nil { s.files[content] = nil }
        }
      } else {
        s.lookups[ino] = c - n
      }
    }
  }

  public var knownInodes: Int { state.withLock { $0.lookups.count } }
}

/// Where the last misses of each partial file content were, to tell streaming readers (which
/// fetch ahead within the file) from the scattered reads of a program that maps its binary. Only
/// misses are recorded: reads of chunks that are here cost nothing. Bounded: forgotten wholesale
/// when full.
package final class ReadPattern: Sendable {
  private let last = Mutex<[ContentID: (start: UInt64, end: UInt64, streak: Int)]>([:])

  /// Records a miss; true from the third miss in a row that starts after the previous one and
  /// within what it fetched (its bytes, plus `ahead` if it fetched ahead). Kernel readahead already
  /// sends the next window of a sequential read; fetching further only pays for a long stream.
  package func miss(_ content: ContentID, offset: UInt64, size: Int, ahead: Int) -> Bool {
    last.withLock { m in
      // The last chunk fetched may reach up to a chunk's size past what was asked for.
      let follows = m[content].map { offset > $0.start && offset <= $0.end + (1 << 20) } ?? false
      let streak = follows ? (m[content]?.streak ?? 0) + 1 : 0
      let streaming = streak >= 2
      if m.count >= 4096 { m.removeAll(keepingCapacity: true) }
      m[content] = (offset, offset + UInt64(size) + UInt64(streaming ? ahead : 0), streak)
      return streaming
    }
  }
}

/// Chunks pods fetch in their first seconds, per publish: what a startup profile is made of.
package final class StartupRecorder: Sendable {
  package struct Window {
    let root: StorePath
    let members: Set<StorePath>
    var chunks: [ChunkRef] = []
    var seen: Set<ChunkID> = []
  }
  private let state = Mutex<(next: Int, open: [Int: Window])>((0, [:]))
  /// Chunks one window records at most (a profile holds no more: `StartupProfile.limit`).
  package static let limit = 65_536

  package func open(root: StorePath, members: Set<StorePath>) -> Int {
    state.withLock { s in
      s.next += 1
      s.open[s.next] = Window(root: root, members: members)
      return s.next
    }
  }

  /// Chunks a read of a file of `path` had to fetch.
  package func record(_ path: StorePath, _ refs: [ChunkRef]) {
    state.withLock { s in
      for (id, var w) in s.open where w.members.contains(path) && w.chunks.count < Self.limit {
        for r in refs where w.seen.insert(r.id).inserted { w.chunks.append(r) }
        s.open[id] = w
      }
    }
  }

  package func close(_ id: Int) -> [ChunkRef] { state.withLock { $0.open.removeValue(forKey: id)?.chunks ?? [] } }
}


extension Duration {
  package var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
