import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization
import Threads
#if canImport(Glibc)
  import Glibc
#endif

// Trees and materialisation: instances of store paths, lookups that fetch, publish-time warm-up and prefetch.
extension StoreFileSystem {
  package func count(_ op: String) { metrics.request(op) }

  package func cachedTree(_ path: StorePath) -> Manifest? {
    let evictions = store.evictions
    return treeCache.withLock { s in
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
    treeCache.withLock { s in
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
    if missing.contains(path) {
      replyNegative(req)
      return
    }
    let task = materialisation(of: path)
    Task {
      let start = ContinuousClock.now
      do {
        try await task.value.get()
        guard let t = self.localTree(path) else {
          self.logger.error("materialised path is not in the store", metadata: ["path": "\(path)"])
          self.replyError(req, EIO, cause: "index")
          return
        }
        self.logger.info(
          "materialised", metadata: ["path": "\(path)", "seconds": "\((ContinuousClock.now - start).seconds)"])
        body(t)
      } catch MaterialiseFailure.notFound(_, let why) {
        self.logger.info("not in any cache", metadata: ["path": "\(path)", "reason": "\(why)"])
        self.metrics.error("not_found")
        self.replyNegative(req)
      } catch {
        self.logger.error("cannot materialise", metadata: ["path": "\(path)", "error": "\(error)"])
        self.replyError(req, EIO, cause: "fetch")
      }
    }
  }

  /// The one download of `path`: lookups and prefetches of a path in flight share it. A path no
  /// cache has is remembered as missing for a while.
  package func materialisation(of path: StorePath) -> Task<Result<Void, any Error>, Never> {
    let (materialiser, metrics) = (self.materialiser, self.metrics)
    return fetches.task(path) { () async -> Result<Void, any Error> in
      metrics.inflight.increment()
      defer { metrics.inflight.decrement() }
      let start = ContinuousClock.now
      do {
        // The tree the materialiser registered goes straight into the tree cache.
        if let tree = try await materialiser.materialise(path, whole: false) { self.remember(path, tree.withoutChunkLists) }
      } catch {
        if case MaterialiseFailure.notFound = error { self.missing.remember(path) }
        return .failure(error)
      }
      metrics.fetchSeconds.recordNanoseconds(Int64((ContinuousClock.now - start).seconds * 1e9))
      metrics.pathsFetched.increment()
      return .success(())
    }
  }

  /// Materialises `paths` now (`nixfs fetch` through a running daemon), `parallel` at a time,
  /// sharing downloads with concurrent lookups. Returns how many were fetched.
  /// Partial paths are completed (their missing chunks fetched).
  public func prefetch(_ paths: [StorePath], parallel: Int) async throws -> Int {
    let missing = paths.filter { !store.isComplete($0) }
    try await inParallel(missing, limit: parallel) { p in
      try await self.materialisation(of: p).value.get()
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
      do { try await materialiser.fetchChunks(absent, for: nil) } catch {
        logger.warning("startup profile prefetch incomplete", metadata: ["path": "\(root)", "error": "\(error)"])
      }
    }
    Task {
      try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
      let read = startups.close(window)
      if !read.isEmpty { await materialiser.reportStartupProfile(read, of: root) }
    }
  }

  package func instance(_ namespace: UInt32, _ path: StorePath) -> UInt32 {
    let (id, isNew) = inodeTable.withLock { s -> (UInt32, Bool) in
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
    if isNew, let e = journal?.instance(id, namespace: namespace, path: path) { journalFailed(e, "\(path) in view \(namespace)") }
    return id
  }
}
