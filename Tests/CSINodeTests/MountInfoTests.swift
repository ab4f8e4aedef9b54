import Foundation
import NodeControl
import Testing
import TestSupport

/// The mount table as a node has it: hundreds of mounts (kubelet's volumes, overlays, views).
@Suite(.serialized) struct MountInfoTests {
  /// Foundation's file readers stopped at 4 KiB of /proc/self/mountinfo (procfs reports size 0):
  /// about 40 mounts, so every mount made after those was invisible to nixfs's checks.
  @Test func everyMountIsSeenOnANodeWithHundredsOfThem() throws {
    let tmp = try TemporaryDirectory("mountinfo")
    var made: [String] = []
    defer { for m in made.reversed() { _ = try? run(["umount", m], check: false) } }
    for i in 0..<300 {
      let dir = tmp.sub("m\(i)")
      try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
      try run(["mount", "-t", "tmpfs", "-o", "size=4k", "mountinfo-test", dir])
      made.append(dir)
    }
    let seen = Set(MountInfo.entries().filter { $0.fileSystemType == "tmpfs" }.map(\.mountPoint))
    #expect(made.allSatisfy(seen.contains), "\(made.filter { !seen.contains($0) }.count) of 300 mounts missing")
  }
}
