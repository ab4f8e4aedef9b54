import ChunkStore
import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

/// A directory listing entry: name, inode (for d_ino) and type bits.
package struct DirectoryEntry {
  package let name: [UInt8]
  package let ino: UInt64
  package let mode: mode_t
}

extension StoreFileSystem {
  package enum VirtualNode {
    case viewsDir
    case viewDir(UInt32)
    case viewStore(UInt32)
    case viewVar(UInt32)
    case viewResult(UInt32)
    /// `var/nix`: empty here; where a volume's Nix state (database, GC roots) is mounted or
    /// overlaid (CSI), so Nix finds it at its default path.
    case viewVarNix(UInt32)
    /// `store/.links`: empty; a directory Nix's local store expects and would otherwise create.
    /// Found by name, not listed: a view's store lists its closure.
    case viewLinks(UInt32)

    /// Numbers of the kinds added after the first four, apart so those keep theirs (the kernel
    /// holds them across a takeover from an older daemon).
    static let extended: UInt64 = 1 << 59

    init(_ n: UInt64) {
      if n == 0 {
        self = .viewsDir
        return
      }
      if n & Self.extended != 0 {
        let m = n & ~Self.extended
        self = m % 2 == 0 ? .viewVarNix(UInt32(m / 2)) : .viewLinks(UInt32(m / 2))
        return
      }
      let v = UInt32(n / 4)
      switch n % 4 {
      case 0: self = .viewDir(v)
      case 1: self = .viewStore(v)
      case 2: self = .viewVar(v)
      default: self = .viewResult(v)
      }
    }

    var number: UInt64 {
      switch self {
      case .viewsDir: 0
      case .viewDir(let v): UInt64(v) * 4
      case .viewStore(let v): UInt64(v) * 4 + 1
      case .viewVar(let v): UInt64(v) * 4 + 2
      case .viewResult(let v): UInt64(v) * 4 + 3
      case .viewVarNix(let v): Self.extended | UInt64(v) * 2
      case .viewLinks(let v): Self.extended | UInt64(v) * 2 + 1
      }
    }

    var ino: UInt64 { Inode.virtual(number) }
  }

  package func view(number: UInt32) -> RegisteredView? {
    viewTable.withLock { s in s.viewNumbers[number].flatMap { s.views[$0] } }
  }

  package func resultTarget(_ v: RegisteredView) -> [UInt8] {
    Array("\(options.storeDir)/\(v.view.result.baseName)".utf8)
  }

  package func virtualAttributes(_ node: VirtualNode) -> stat? {
    switch node {
    case .viewsDir: return directoryAttributes(ino: node.ino)
    case .viewDir(let v), .viewStore(let v), .viewVar(let v), .viewVarNix(let v), .viewLinks(let v):
      return view(number: v) == nil ? nil : directoryAttributes(ino: node.ino)
    case .viewResult(let v):
      guard let view = view(number: v) else { return nil }
      return attributes(ino: node.ino, of: .symlink(target: resultTarget(view)))
    }
  }

  package func storePath(_ name: UnsafeRawBufferPointer) -> StorePath? {
    try? StorePath(baseName: String(decoding: name, as: UTF8.self), storeDir: options.storeDir)
  }

  /// Replies with the root of `path` as seen in `namespace`, materialising it if needed.
  package func resolve(_ req: any Replier, namespace: UInt32, path: StorePath) {
    withTree(path, req, resolution: true) { tree in
      self.store.touch(path)
      let (ino, st) = self.entry(tree, path: path, instance: self.instance(namespace, path), index: 0)
      self.replyEntry(req, ino: ino, attr: st)
    }
  }

  package func lookup(_ req: any Replier, parent: UInt64, name: UnsafeRawBufferPointer) {
    count("lookup")
    switch Inode.decode(parent) {
    case .root:
      if name.elementsEqual(Self.viewsDirName.utf8) {
        replyEntry(req, ino: VirtualNode.viewsDir.ino, attr: directoryAttributes(ino: VirtualNode.viewsDir.ino))
      } else if let path = storePath(name) {
        resolve(req, namespace: 0, path: path)
      } else {
        replyNegative(req)
      }
    case .virtual(let n):
      lookupVirtual(req, VirtualNode(n), name: name)
    case .node(let instance, let index):
      guard let key = inodeTable.withLock({ $0.instances[instance] }) else {
        replyError(req, ESTALE, cause: "stale")
        return
      }
      let name = Array(name)
      withTree(key.path, req) { tree in
        guard let child = tree.lookup(Int(index), name) else {
          if case .directory = tree.nodes[Int(index)].kind {
            // Immutable: a missing name stays missing.
            req.entry(ino: 0, attr: stat(), timeout: self.options.entryTimeout)
          } else {
            self.replyError(req, ENOTDIR, cause: "client")
          }
          return
        }
        let (ino, st) = self.entry(tree, path: key.path, instance: instance, index: Int32(child))
        self.replyEntry(req, ino: ino, attr: st)
      }
    case .file:
      replyError(req, ENOTDIR, cause: "client")
    case .invalid:
      replyError(req, ESTALE, cause: "stale")
    }
  }

  package func lookupVirtual(_ req: any Replier, _ parent: VirtualNode, name: UnsafeRawBufferPointer) {
    let text = String(decoding: name, as: UTF8.self)
    var child: VirtualNode? = nil
    switch parent {
    case .viewsDir:
      if let v = viewTable.withLock({ $0.views[text]?.number }) { child = .viewDir(v) }
    case .viewDir(let v):
      if text == "store" { child = .viewStore(v) } else if text == "var" { child = .viewVar(v) }
    case .viewVar(let v):
      if text == "result" { child = .viewResult(v) } else if text == "nix" { child = .viewVarNix(v) }
    case .viewVarNix, .viewLinks:
      break
    case .viewStore(let v):
      if text == ".links" {
        child = .viewLinks(v)
        break
      }
      guard let view = view(number: v), let path = storePath(name), view.members.contains(path) else {
        replyNegative(req)
        return
      }
      resolve(req, namespace: v, path: path)
      return
    case .viewResult:
      replyError(req, ENOTDIR, cause: "client")
      return
    }
    guard let child, let st = virtualAttributes(child) else {
      // Views come and go: do not let the kernel cache their absence.
      req.entry(ino: 0, attr: stat(), timeout: 0)
      return
    }
    // Nor which view a name is: a volume published again under the same ID after its unpublish
    // is another view (another number), and a cached entry would bind the old, gone one.
    if case .viewsDir = parent {
      replyEntry(req, ino: child.ino, attr: st, timeout: 0)
    } else {
      replyEntry(req, ino: child.ino, attr: st)
    }
  }

  package func getattr(_ req: any Replier, ino: UInt64) {
    count("getattr")
    switch Inode.decode(ino) {
    case .root:
      replyAttr(req, directoryAttributes(ino: Inode.root))
    case .virtual(let n):
      guard let st = virtualAttributes(VirtualNode(n)) else { return replyError(req, ESTALE, cause: "stale") }
      replyAttr(req, st)
    case .file(let number, let executable):
      guard let info = inodeTable.withLock({ $0.files[number] }) else { return replyError(req, ESTALE, cause: "stale") }
      replyAttr(req, attributes(ino: ino, of: .regular(content: info.content, size: info.size, executable: executable)))
    case .node(let instance, let index):
      guard let key = inodeTable.withLock({ $0.instances[instance] }) else { return replyError(req, ESTALE, cause: "stale") }
      withTree(key.path, req) { tree in
        self.replyAttr(req, self.attributes(ino: ino, of: tree.nodes[Int(index)].kind))
      }
    case .invalid:
      replyError(req, ESTALE, cause: "stale")
    }
  }

  package func readlink(_ req: any Replier, ino: UInt64) {
    count("readlink")
    switch Inode.decode(ino) {
    case .virtual(let n):
      guard case .viewResult(let v) = VirtualNode(n), let view = view(number: v) else {
        return replyError(req, EINVAL, cause: "client")
      }
      req.symlink(resultTarget(view))
    case .node(let instance, let index):
      guard let key = inodeTable.withLock({ $0.instances[instance] }) else { return replyError(req, ESTALE, cause: "stale") }
      withTree(key.path, req) { tree in
        guard case .symlink(let target) = tree.nodes[Int(index)].kind else {
          return self.replyError(req, EINVAL, cause: "client")
        }
        req.symlink(target)
      }
    default:
      replyError(req, EINVAL, cause: "client")
    }
  }

  package func open(_ req: any Replier, ino: UInt64, flags: Int32) {
    count("open")
    if flags & O_ACCMODE != O_RDONLY { return replyError(req, EROFS, cause: "client") }
    guard let file = file(ino) else { return replyError(req, EISDIR, cause: "client") }
    let path = file.path
    // Pin the path while a file of it is open, so GC cannot take its chunks away.
    store.pin(path)
    let handle = handleTable.withLock { s -> UInt64 in
      let h = s.nextHandle
      s.nextHandle += 1
      s.openHandles[h] = path
      return h
    }
    // GC may have evicted the path while the kernel still holds its entries (long timeouts):
    // fetch it again before the open succeeds, so reads find their chunks.
    if store.evictions > 0, localTree(path) == nil {
      logger.info("re-fetching an evicted path on open", metadata: ["path": "\(path)"])
      withTree(path, req) { _ in self.answerOpen(req, ino: ino, file: file, handle: handle) }
      return
    }
    answerOpen(req, ino: ino, file: file, handle: handle)
  }

  /// Through the backing file where the kernel may read it itself, else through this daemon.
  func answerOpen(_ req: any Replier, ino: UInt64, file: FileInfo, handle: UInt64) {
    if let id = passthrough?.open(ino: ino, content: file.content, size: file.size) {
      req.openedPassthrough(handle: handle, backingID: id)
    } else {
      req.opened(handle: handle, keepCache: true, cacheDirectory: false)
    }
  }

  package func release(handle: UInt64, ino: UInt64) {
    passthrough?.release(ino: ino)
    if let path = handleTable.withLock({ $0.openHandles.removeValue(forKey: handle) }) {
      store.unpin(path)
    }
  }

  /// The file behind an inode: by content, or (after a number clash) through its path's tree.
  package func file(_ ino: UInt64) -> FileInfo? {
    switch Inode.decode(ino) {
    case .file(let number, _):
      return inodeTable.withLock { $0.files[number] }
    case .node(let instance, let index):
      guard let key = inodeTable.withLock({ $0.instances[instance] }), let tree = localTree(key.path),
        case .regular(let content, let size, _) = tree.nodes[Int(index)].kind
      else { return nil }
      return FileInfo(content: content, size: size, path: key.path)
    default:
      return nil
    }
  }

  package func read(_ req: any Replier, ino: UInt64, size: Int, offset: off_t) {
    guard let file = file(ino) else {
      return replyError(req, ESTALE, cause: "stale")
    }
    do {
      if try replyRead(req, file.content, size: size, offset: offset) { return }
    } catch {
      logger.error("read failed", metadata: ["content": "\(file.content)", "offset": "\(offset)", "error": "\(error)"])
      return replyError(req, EIO, cause: "read")
    }
    // A partial path's chunks are not all here: fetch them (never on this worker), then answer.
    // A small file comes whole on its first miss (a .pyc, a small .so: read whole anyway); a
    // larger one with the chunks around the miss, in the same round trip.
    let (from, count, ahead): (UInt64, Int, Int)
    if file.size <= Self.wholeFileLimit {
      (from, count, ahead) = (0, Int(file.size), 0)
    } else {
      let w = readPattern.window(file.content, offset: UInt64(offset), size: size, streamAhead: Self.readAhead)
      let back = min(UInt64(w.back), UInt64(offset))
      (from, count, ahead) = (UInt64(offset) - back, size + Int(back), w.ahead)
    }
    Task {
      do {
        for _ in 0..<3 {
          let refs = try self.store.absentChunks(content: file.content, offset: from, count: count, ahead: ahead)
          self.startups.record(file.path, refs)
          try await self.materialiser.fetchChunks(refs, for: file.path)
          if try self.replyRead(req, file.content, size: size, offset: offset) { return }
        }
        throw MaterialiseFailure.chunksStillAbsent(file.path)
      } catch {
        self.logger.error(
          "cannot fetch the chunks of a read",
          metadata: ["path": "\(file.path)", "content": "\(file.content)", "offset": "\(offset)", "error": "\(error)"])
        self.replyError(req, EIO, cause: "fetch")
      }
    }
  }

  /// How far past a sequential read a partial file's chunks are fetched with it.
  package static let readAhead = 2 << 20
  /// Files up to this size are fetched whole on their first miss.
  package static let wholeFileLimit: UInt64 = 256 << 10

  /// Answers a read from the store; false (nothing sent) when a chunk it needs is absent.
  package func replyRead(_ req: any Replier, _ content: ContentID, size: Int, offset: off_t) throws -> Bool {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 16)
    defer { buffer.deallocate() }
    let n: Int
    do {
      n = try store.read(content: content, offset: UInt64(offset), into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size]))
    } catch {
      if case .chunkAbsent = error { return false }
      throw error
    }
    metrics.request("read")
    metrics.bytesServed.increment(by: Int64(n))
    req.bytes(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
    return true
  }

  // MARK: Directories

  package enum Listing {
    /// A directory of the mount itself (root, views): listed at opendir, kept with the handle.
    case entries([DirectoryEntry])
    /// A directory inside a store path: listed from its tree at readdir.
    case tree
    case error(Int32, cause: String)
  }

  package func listing(_ ino: UInt64) -> Listing {
    switch Inode.decode(ino) {
    case .root:
      // What this node has or is fetching; never the caches' contents.
      var paths = Set(store.servablePaths())
      paths.formUnion(fetches.keys)
      return .entries(
        paths.sorted().map { p in
          DirectoryEntry(name: Array(p.baseName.utf8), ino: Inode.node(instance: instance(0, p), index: 0), mode: 0)
        })
    case .virtual(let n):
      switch VirtualNode(n) {
      case .viewsDir:
        return .entries(
          viewTable.withLock { s in
            s.views.values.sorted { $0.view.id < $1.view.id }.map {
              DirectoryEntry(name: Array($0.view.id.utf8), ino: VirtualNode.viewDir($0.number).ino, mode: S_IFDIR)
            }
          })
      case .viewDir(let v):
        return .entries([
          DirectoryEntry(name: Array("store".utf8), ino: VirtualNode.viewStore(v).ino, mode: S_IFDIR),
          DirectoryEntry(name: Array("var".utf8), ino: VirtualNode.viewVar(v).ino, mode: S_IFDIR),
        ])
      case .viewVar(let v):
        return .entries([
          DirectoryEntry(name: Array("nix".utf8), ino: VirtualNode.viewVarNix(v).ino, mode: S_IFDIR),
          DirectoryEntry(name: Array("result".utf8), ino: VirtualNode.viewResult(v).ino, mode: S_IFLNK),
        ])
      case .viewVarNix, .viewLinks:
        return .entries([])
      case .viewStore(let v):
        guard let view = view(number: v) else { return .error(ESTALE, cause: "stale") }
        return .entries(
          view.view.closure.map { p in
            DirectoryEntry(name: Array(p.baseName.utf8), ino: Inode.node(instance: instance(v, p), index: 0), mode: 0)
          })
      case .viewResult:
        return .error(ENOTDIR, cause: "client")
      }
    case .node:
      return .tree
    case .file:
      return .error(ENOTDIR, cause: "client")
    case .invalid:
      return .error(ESTALE, cause: "stale")
    }
  }

  package func opendir(_ req: any Replier, ino: UInt64) {
    count("opendir")
    switch listing(ino) {
    case .error(let e, let cause):
      replyError(req, e, cause: cause)
    case .tree:
      // Immutable: the kernel may cache the listing and pages for good.
      req.opened(handle: 0, keepCache: true, cacheDirectory: true)
    case .entries(let listing):
      let handle = handleTable.withLock { s -> UInt64 in
        let h = s.nextHandle
        s.nextHandle += 1
        s.dirListings[h] = listing
        return h
      }
      req.opened(handle: handle, keepCache: false, cacheDirectory: false)
    }
  }

  package func releaseDirectory(handle: UInt64) {
    _ = handleTable.withLock { $0.dirListings.removeValue(forKey: handle) }
  }

  package func readdir(_ req: any Replier, ino: UInt64, size: Int, offset: off_t, handle: UInt64) {
    count("readdir")
    if case .node(let instance, let index) = Inode.decode(ino) {
      guard let key = inodeTable.withLock({ $0.instances[instance] }) else { return replyError(req, ESTALE, cause: "stale") }
      withTree(key.path, req) { tree in
        guard case .directory = tree.nodes[Int(index)].kind else {
          return self.replyError(req, ENOTDIR, cause: "client")
        }
        let listing = tree.children(of: Int(index)).map { i -> DirectoryEntry in
          let node = tree.nodes[i]
          switch node.kind {
          case .regular(let content, _, let executable):
            // The same number lookup() gives, unless that content's number clashed.
            let ino = Inode.file(content: Inode.fileNumber(content), executable: executable)
            return DirectoryEntry(name: node.name, ino: ino, mode: S_IFREG)
          case .directory:
            return DirectoryEntry(name: node.name, ino: Inode.node(instance: instance, index: Int32(i)), mode: S_IFDIR)
          case .symlink:
            return DirectoryEntry(name: node.name, ino: Inode.node(instance: instance, index: Int32(i)), mode: S_IFLNK)
          }
        }
        self.replyListing(req, ino: ino, listing, size: size, offset: offset)
      }
      return
    }
    if let listing = handleTable.withLock({ $0.dirListings[handle] }) {
      return replyListing(req, ino: ino, listing, size: size, offset: offset)
    }
    // A handle opened with the daemon before a takeover or crash: list the directory again.
    guard case .entries(let listing) = listing(ino) else { return replyError(req, EBADF, cause: "client") }
    replyListing(req, ino: ino, listing, size: size, offset: offset)
  }

  /// READDIRPLUS: inside a store path every entry comes with its attributes, so `find` and
  /// `ls -l` need no lookup per name; the mount's own directories (root, views) list names only
  /// (a store path's attributes would mean fetching it).
  package func readdirplus(_ req: any Replier, ino: UInt64, size: Int, offset: off_t, handle: UInt64) {
    count("readdir")
    guard case .node(let instance, let index) = Inode.decode(ino) else {
      let listing: [DirectoryEntry]
      if let l = handleTable.withLock({ $0.dirListings[handle] }) {
        listing = l
      } else if case .entries(let l) = self.listing(ino) {
        listing = l
      } else {
        return replyError(req, EBADF, cause: "client")
      }
      let plain = plusEntries(directory: ino, from: Int(offset), count: listing.count + 2, size: size) { i in
        var st = stat()
        st.st_ino = UInt(listing[i].ino)
        st.st_mode = listing[i].mode
        return PlusEntry(name: listing[i].name, ino: 0, attr: st)
      }
      return req.listingPlus(plain, directory: ino, offset: Int(offset), size: size, timeout: 0) { _ in }
    }
    guard let key = inodeTable.withLock({ $0.instances[instance] }) else { return replyError(req, ESTALE, cause: "stale") }
    withTree(key.path, req) { tree in
      guard case .directory = tree.nodes[Int(index)].kind else {
        return self.replyError(req, ENOTDIR, cause: "client")
      }
      let children = tree.children(of: Int(index))
      let entries = self.plusEntries(directory: ino, from: Int(offset), count: children.count + 2, size: size) { i in
        let node = children.lowerBound + i
        let (child, st) = self.entry(tree, path: key.path, instance: instance, index: Int32(node))
        return PlusEntry(name: tree.nodes[node].name, ino: child, attr: st)
      }
      req.listingPlus(entries, directory: ino, offset: Int(offset), size: size, timeout: self.options.entryTimeout) { range in
        // Every entry the kernel gets is a lookup it will forget ("." and ".." are not).
        self.inodeTable.withLock { s in
          for e in entries[range] where e.ino != 0 { s.lookups[e.ino, default: 0] += 1 }
        }
      }
    }
  }

  /// The entries a READDIRPLUS answer from `from` can hold ("." and ".." first, as 0 and 1):
  /// each takes at least 152 bytes, so no more than that many are made (each made entry may
  /// register a node number).
  func plusEntries(directory: UInt64, from: Int, count: Int, size: Int, _ make: (Int) -> PlusEntry) -> [PlusEntry] {
    var out: [PlusEntry] = []
    let room = size / 152 + 1
    var i = from
    while i < count && out.count < room {
      switch i {
      case 0:
        var st = directoryAttributes(ino: directory)
        st.st_ino = UInt(directory)
        out.append(PlusEntry(name: Array(".".utf8), ino: 0, attr: st))
      case 1:
        var st = stat()
        st.st_ino = UInt(Inode.root)
        st.st_mode = S_IFDIR
        out.append(PlusEntry(name: Array("..".utf8), ino: 0, attr: st))
      default:
        out.append(make(i - 2))
      }
      i += 1
    }
    return out
  }

  package func replyListing(_ req: any Replier, ino: UInt64, _ listing: [DirectoryEntry], size: Int, offset: off_t) {
    req.listing(listing, directory: ino, offset: Int(offset), size: size)
  }

  package func statfs(_ req: any Replier) {
    var vfs = statvfs()
    if statvfs(options.statfsPath, &vfs) != 0 { vfs = Glibc.statvfs() }
    vfs.f_namemax = 255
    vfs.f_flag |= UInt(ST_RDONLY)
    req.filesystem(vfs)
  }
}
