import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization
import Threads

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
  /// FUSE passthrough of complete files to backing files (nil: off).
  public var passthrough: PassthroughOptions? = nil
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
public final class StoreFileSystem: Sendable {
  public static let viewsDirName = ".views"

  package let store: ChunkStore
  package let materialiser: any Materialiser
  package let options: StoreFSOptions
  package let logger: Logger
  /// Each part of the core's state under its own small lock; no lock is taken while another is
  /// held, so they need no order.
  package let inodeTable = Mutex(Inodes())
  package let treeCache = Mutex(TreeCache())
  /// The one download of each path in flight: lookups and prefetches of a path share it.
  package let fetches = SingleFlight<StorePath, Result<Void, any Error>>()
  /// Paths no cache had, for the negative timeout.
  package let missing: NegativeCache<StorePath>
  package let viewTable = Mutex(ViewTable())
  package let handleTable = Mutex(Handles())
  package let metrics = FSMetrics()
  /// What the kernel's node ids mean, for the next daemon on this connection (set by the mount).
  package var journal: KernelViewJournal? {
    get { journalSlot.withLock { $0 } }
    set {
      journalSlot.withLock { $0 = newValue }
      passthrough?.journalSlot.withLock { $0 = newValue }
    }
  }
  private let journalSlot = Mutex<KernelViewJournal?>(nil)
  package let readPattern = ReadPattern()
  /// Backing files and the kernel's passthrough opens (nil with passthrough off).
  package let passthrough: Passthrough?
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

  /// What the kernel's node ids mean: tree instances, the files it knows, its lookup counts.
  package struct Inodes {
    var instances: [UInt32: InstanceKey] = [:]
    var instanceIDs: [InstanceKey: UInt32] = [:]
    var nextInstance: UInt32 = 1
    /// Files the kernel knows, by inode number less the executable bit.
    var files: [UInt64: FileInfo] = [:]
    var lookups: [UInt64: UInt64] = [:]  // nlookup by inode (files and nodes)
  }

  /// Trees of local paths, least recently used evicted past a node budget.
  package struct TreeCache {
    var trees: [StorePath: (tree: Manifest, used: UInt64)] = [:]
    var treeNodes = 0
    var clock: UInt64 = 0
    var evictionsSeen: UInt64 = 0
  }

  /// The published views, by ID and by number.
  package struct ViewTable {
    var views: [String: RegisteredView] = [:]
    var viewNumbers: [UInt32: String] = [:]
    var nextView: UInt32 = 1
  }

  /// Open file handles and directory listings.
  package struct Handles {
    var openHandles: [UInt64: StorePath] = [:]
    var dirListings: [UInt64: [DirectoryEntry]] = [:]
    var nextHandle: UInt64 = 1
  }

  public init(store: ChunkStore, materialiser: any Materialiser, options: StoreFSOptions = .init(), logger: Logger) {
    self.store = store
    self.materialiser = materialiser
    self.options = options
    self.logger = logger
    missing = NegativeCache(lifetime: .milliseconds(Int64(options.negativeTimeout * 1000)))
    passthrough = options.passthrough.map { Passthrough(options: $0, store: store, logger: logger) }
  }

  /// Loads what the previous daemon told the kernel, so its node ids keep their meaning.
  package func restore(_ view: KernelViewState) {
    inodeTable.withLock { s in
      for (id, i) in view.instances {
        let key = InstanceKey(namespace: i.namespace, path: i.path)
        s.instances[id] = key
        s.instanceIDs[key] = id
        s.nextInstance = max(s.nextInstance, id + 1)
      }
      for (number, f) in view.files { s.files[number] = FileInfo(content: f.content, size: f.size, path: f.path) }
    }
    viewTable.withLock { s in
      for (number, v) in view.views {
        s.views[v.id] = RegisteredView(view: v, number: number, members: Set(v.closure))
        s.viewNumbers[number] = v.id
        s.nextView = max(s.nextView, number + 1)
      }
    }
    passthrough?.restore(view.opens)
    // Handles the kernel still holds from before must never be mistaken for new ones.
    handleTable.withLock { $0.nextHandle = view.generation << 40 + 1 }
  }
}
