import Foundation
import Testing
import TestSupport

/// Process fixtures (held by a static `OnceFixture`, never deinitialised) must not pile up in /tmp
/// across runs: making one removes those of processes that have exited, and no other.
@Suite struct TemporaryDirectoryTests {
  @Test func aProcessFixtureRemovesOnlyThoseOfExitedProcesses() throws {
    let base = try TemporaryDirectory("leftovers")
    let exited = Process()
    exited.executableURL = URL(fileURLWithPath: "/bin/true")
    try exited.run()
    exited.waitUntilExit()
    let gone = base.sub("nixfs-fixture-p\(exited.processIdentifier)-0000aaaa")
    let live = base.sub("nixfs-fixture-p\(getpid())-0000bbbb")
    let other = base.sub("nixfs-fixtures-p\(exited.processIdentifier)-0000cccc")
    for d in [gone, live, other] { try FileManager.default.createDirectory(atPath: d + "/sub", withIntermediateDirectories: true) }
    // Read-only inside, like a store path.
    chmod(gone + "/sub", 0o555)

    let made = try TemporaryDirectory("fixture", forProcess: true, in: base.path)

    #expect(!FileManager.default.fileExists(atPath: gone), "the exited process's fixture is still there")
    #expect(FileManager.default.fileExists(atPath: live), "a running process's fixture was removed")
    #expect(FileManager.default.fileExists(atPath: other), "another label's fixture was removed")
    #expect(made.path.hasPrefix(base.sub("nixfs-fixture-p\(getpid())-")))
  }
}
