import CFuse3
import Foundation
import StoreFS
import Logging
import NixFormats
import NodeControl
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// The filesystem mounted: one FUSE session at a time, and the takeover of its connection.
public final class FuseMount: @unchecked Sendable {
  public let filesystem: StoreFileSystem
  /// Set and cleared by the serving thread; read by `handOver` from the control socket's.
  let session = Mutex<FuseSession?>(nil)
  let gate = HandoverGate()

  public init(_ filesystem: StoreFileSystem) { self.filesystem = filesystem }

  var options: StoreFSOptions { filesystem.options }
  var logger: Logger { filesystem.logger }

  /// The session options: read-only, nosuid, nodev (the store is immutable and never setuid).
  var sessionOptions: [String] {
    var opts = ["ro", "nosuid", "nodev", "fsname=nixfs", "subtype=nixfs", "default_permissions"]
    if getuid() == 0 { opts.append("allow_other") }
    return opts
  }

  /// Mounts at `mountpoint` (or serves the connection `source` hands over) until unmounted from
  /// outside, a signal arrives, or a successor takes the connection over. Blocks the calling
  /// thread. `stateDir` holds the kernel-view journal. With `keepMountOnSignal` (a keeper holds
  /// the connection) a signal stops serving without unmounting, so the next daemon picks it up.
  /// `onServing` runs once the connection is served, with its descriptor and a function that gives
  /// its handover record once there is one (a new mount has one when the kernel's INIT arrived).
  public func serve(
    at mountpoint: String, source: MountSource = .fresh, stateDir: String, keepMountOnSignal: Bool = false,
    onServing: @escaping @Sendable (_ record: @escaping @Sendable () -> Handover?, Int32) -> Void = { _, _ in }
  ) throws -> ServeOutcome {
    let s: FuseSession
    let connection: String
    nixfs_fuse_set_want_passthrough(filesystem.passthrough == nil ? 0 : 1)
    switch source {
    case .fresh:
      try Mountpoint.prepare(mountpoint, allowNonEmpty: options.allowNonEmpty, logger: logger)
      connection = UUID().uuidString.lowercased()
      filesystem.journal = try KernelViewJournal.create(stateDir: stateDir, connection: connection)
      s = try FuseSession(
        mountpoint: mountpoint, options: sessionOptions, operations: StoreFileSystem.operations,
        userdata: Unmanaged.passUnretained(filesystem).toOpaque())
      logger.info("mounted", metadata: ["mountpoint": "\(mountpoint)", "connection": "\(connection)"])
    case .adopted(let handover, let fd):
      connection = handover.connection
      var view = KernelViewState()
      do {
        view = try KernelViewJournal.load(stateDir: stateDir, connection: connection, storeDir: options.storeDir)
      } catch {
        // Serve anyway: nodes the kernel knows from before answer ESTALE, new lookups work.
        logger.error("cannot replay the kernel view", metadata: ["error": "\(error)"])
      }
      view.generation += 1
      filesystem.restore(view)
      filesystem.journal = try KernelViewJournal.create(stateDir: stateDir, connection: connection, state: view)
      nixfs_fuse_set_passthrough(view.passthrough ? 1 : 0)
      s = try FuseSession(
        adopting: fd, initRequest: [UInt8](handover.initRequest), mountpoint: mountpoint, options: sessionOptions,
        operations: StoreFileSystem.operations, userdata: Unmanaged.passUnretained(filesystem).toOpaque())
      if let why = s.resendUnanswered() {
        logger.warning(
          "the kernel cannot resend requests the previous daemon left unanswered (needs Linux 6.9+); they stay blocked",
          metadata: ["error": "\(why)"])
      }
      logger.info(
        "took over the FUSE connection",
        metadata: [
          "mountpoint": "\(mountpoint)", "connection": "\(connection)", "from_version": "\(handover.version)",
          "generation": "\(view.generation)", "inodes": "\(view.files.count + view.instances.count)",
        ])
    }
    session.withLock { $0 = s }
    defer { session.withLock { $0 = nil } }
    let detaching = Atomic<Bool>(false)
    TerminationSignals.onTermination { [logger] in
      if keepMountOnSignal {
        logger.info("stopping without unmounting: the keeper holds the connection for the next daemon")
        detaching.store(true, ordering: .sequentiallyConsistent)
        s.stop()
      } else {
        s.exit()
        s.unmount()
      }
    }
    onServing({ [self] in s.initRequest.isEmpty ? nil : handover(of: s, connection: connection) }, s.fd)
    connectPassthrough(s, adopted: { if case .adopted = source { true } else { false } }())
    while true {
      let rc = s.run(maxThreads: options.maxThreads)
      let ended = gate.loopEnded()
      if ended.again {
        logger.warning("the takeover failed: serving on")
        s.resume()
        continue
      }
      if ended.handedOver {
        s.relinquish()
        logger.info("handed the FUSE connection over", metadata: ["mountpoint": "\(mountpoint)"])
        return .handedOver
      }
      if detaching.load(ordering: .sequentiallyConsistent) {
        s.mute()
        s.relinquish()
        return .detached
      }
      s.unmount()
      logger.info("unmounted", metadata: ["mountpoint": "\(mountpoint)", "status": "\(rc)"])
      return .unmounted
    }
  }

  /// Once the connection's INIT is answered (at once for a successor), tells the core whether
  /// it may pass files through, and journals that the connection can.
  func connectPassthrough(_ s: FuseSession, adopted: Bool) {
    guard let passthrough = filesystem.passthrough else { return }
    let registrar = FuseBackingRegistrar(device: s.fd)
    let journal = filesystem.journal
    Thread.detachNewThread {
      if !adopted {
        var waited = 0
        while nixfs_fuse_init_answered() == 0 && waited < 60_000 {
          usleep(5_000)
          waited += 5
        }
      }
      let negotiated: Result<Void, PassthroughUnavailable>
      if nixfs_fuse_passthrough() != 0 {
        if !adopted { journal?.passthroughNegotiated() }
        negotiated = .success(())
      } else if adopted {
        negotiated = .failure(PassthroughUnavailable("the connection was set up without passthrough (by an earlier daemon)"))
      } else if nixfs_fuse_kernel_offers_passthrough() == 0 {
        negotiated = .failure(PassthroughUnavailable("the kernel offers no FUSE passthrough (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"))
      } else {
        negotiated = .failure(PassthroughUnavailable("the INIT reply could not ask for passthrough"))
      }
      passthrough.connect(registrar, negotiated: negotiated)
    }
  }

  func handover(of s: FuseSession, connection: String) -> Handover {
    Handover(version: NixFSVersion.string, connection: connection, initRequest: Data(s.initRequest), mountpoint: s.mountpoint)
  }

  /// For a successor: stops reading requests, waits for the workers to finish theirs, mutes the
  /// rest, and returns the connection's record and descriptor. Then `finishHandover` says whether
  /// the successor got them (else this daemon serves on).
  public func handOver(timeout: Double = 10) -> (Handover, Int32)? {
    guard let s = session.withLock({ $0 }), let journal = filesystem.journal else { return nil }
    guard gate.stop(timeout: timeout, { s.stop() }) else {
      s.resume()
      return nil
    }
    s.mute()
    return (handover(of: s, connection: journal.connection), s.fd)
  }

  public func finishHandover(succeeded: Bool) { gate.decide(handedOver: succeeded) }

}
