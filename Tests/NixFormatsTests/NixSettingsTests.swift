import Foundation
import Testing
import TestSupport

/// The fixtures build with the project's own Nix settings (scripts/nix/nix.conf), whatever the
/// machine's Nix configuration says. A fresh Debian machine has no `nixbld` group, and CI was green
/// only on machines that had one: these tests make the machine hostile on purpose.
@Suite struct NixSettingsTests {
  /// A machine whose Nix configuration names a build-users group that does not exist, in every
  /// place Nix looks: /etc/nix (NIX_CONF_DIR), the user's config and NIX_CONFIG.
  static func hostileMachine(_ tmp: TemporaryDirectory) throws -> [String: String] {
    let conf = "build-users-group = nixfs-test-no-such-group\nsubstituters = http://127.0.0.1:9\n"
    try Tree.file(tmp.sub("etc-nix/nix.conf"), conf)
    try Tree.file(tmp.sub("xdg/nix/nix.conf"), conf)
    return [
      "NIX_CONF_DIR": tmp.sub("etc-nix"), "XDG_CONFIG_HOME": tmp.sub("xdg"), "NIX_CONFIG": conf,
    ]
  }

  /// nix-build of a one-line derivation with a busybox builder into a fresh chroot store.
  static func build(_ tmp: TemporaryDirectory, environment: [String: String]) throws -> CommandResult {
    let store = tmp.sub("root")
    let bb = tmp.sub("busybox")
    try Tree.directory("\(bb)/bin")
    try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: "\(bb)/bin/busybox")
    let busybox = try run(["nix-store", "--store", store, "--add", bb], environment: NixFixture.environment).trimmed
    try """
      let sh = "${builtins.storePath "\(busybox)"}/bin/busybox"; in
      derivation { name = "probe"; system = "x86_64-linux"; builder = sh;
        args = ["sh" "-c" "echo built > $out"]; }
      """.write(toFile: tmp.sub("probe.nix"), atomically: true, encoding: .utf8)
    return try run(
      ["nix-build", "--store", store, "--no-out-link", tmp.sub("probe.nix")], environment: environment, check: false)
  }

  @Test func fixturesBuildWhateverTheMachineConfigures() throws {
    let tmp = try TemporaryDirectory("nix-settings")
    let hostile = try Self.hostileMachine(tmp)
    let result = try Self.build(tmp, environment: hostile.merging(NixFixture.environment) { $1 })
    #expect(result.status == 0, "\(result.stderr)")
    let out = result.trimmed
    #expect(try String(contentsOfFile: tmp.sub("root") + out, encoding: .utf8) == "built\n")
  }

  /// The control: the hostile configuration does break a build that does not use the project's
  /// settings, the way a fresh machine broke `make test` (so the test above can fail).
  @Test func theHostileMachineBreaksBuildsWithoutTheProjectSettings() throws {
    let tmp = try TemporaryDirectory("nix-settings-control")
    let result = try Self.build(tmp, environment: try Self.hostileMachine(tmp).merging(["NIX_REMOTE": ""]) { $1 })
    #expect(result.status != 0)
    #expect(result.stderr.contains("nixfs-test-no-such-group"), "\(result.stderr)")
  }

  /// Every other place this repository runs Nix (the demo, the benchmark fixtures) takes the same
  /// settings file and shuts out the machine's.
  @Test(arguments: [
    "scripts/demo.sh", "scripts/fuzz.sh", "bench/coldstart/fixtures.py", "bench/fs-bench.sh",
    "bench/CacheBench/main.swift",
  ])
  func scriptsUseTheProjectSettings(_ script: String) throws {
    let text = try String(contentsOfFile: "\(repositoryRoot)/\(script)", encoding: .utf8)
    #expect(text.contains("scripts/nix"), "\(script) does not point NIX_CONF_DIR at scripts/nix")
    #expect(text.contains("NIX_USER_CONF_FILES"), "\(script) does not shut out the user's nix.conf")
    #expect(!text.contains("sandbox = false"), "\(script) spells Nix settings of its own")
  }
}
