import ArgumentParser
import Foundation
import Logging
import NodeControl

/// What a daemon becomes after handing its mount over with `--after-takeover wait`.
struct IdleCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "idle", abstract: "Wait until terminated (what `nixfs mount --after-takeover wait` becomes).",
    shouldDisplay: false)

  func run() throws {
    FileHandle.standardError.write(Data("nixfs: handed the mount over; idle until terminated\n".utf8))
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&set, s) }
    pthread_sigmask(SIG_BLOCK, &set, nil)
    var signal: Int32 = 0
    sigwait(&set, &signal)
    Glibc.exit(0)
  }
}

/// `nixfs keeper`: holds the FUSE connection for the daemon beside it.
struct KeeperCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "keeper",
    abstract: "Hold the node daemon's FUSE connection so that a crash or restart of the daemon never breaks a pod.",
    discussion: """
      Run beside `nixfs mount --keeper SOCKET` (in Kubernetes: another container of the same pod, \
      SOCKET on a shared emptyDir). The keeper only holds a descriptor; it never serves requests. \
      While it runs, a daemon that dies leaves pods' requests waiting in the kernel until the next \
      daemon picks the connection up.
      """)

  @Option(help: "The socket to listen on.") var socket: String
  @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
  @Option(help: "Log lines as text, or as one JSON object each (json).") var logFormat: LogFormat = .text

  func validate() throws { try checkLogLevel(logLevel) }

  func run() throws {
    let logger = bootstrapLogging(level: logLevel, label: "nixfs.keeper", format: logFormat)
    let dir = (socket as NSString).deletingLastPathComponent
    if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
    // Blocked before any thread starts, so every thread leaves them to sigwait below.
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&set, s) }
    pthread_sigmask(SIG_BLOCK, &set, nil)
    let server: LineServer<KeeperRequest, KeeperResponse>
    do { server = try Keeper(logger: logger).serve(socketPath: socket) } catch { fail("\(error)") }
    logger.info("keeper listening", metadata: ["socket": "\(socket)"])
    var signal: Int32 = 0
    sigwait(&set, &signal)
    server.stop()
    Glibc.exit(0)
  }
}
