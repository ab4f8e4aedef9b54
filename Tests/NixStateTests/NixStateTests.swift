import Foundation
import NixFormats
import NixState
import Testing
import TestSupport

/// Nix's database for a closure, generated from its narinfos, against the one real Nix wrote when
/// it built and added the same paths.
@Suite struct NixStateTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// The closure of the fixture's `app` (app -> lib -> busybox), as its narinfos in the cache say.
  func closure() throws -> [ValidPath] {
    let app = fx.paths["app"]!
    var out: [StorePath: ValidPath] = [:]
    var queue = [app]
    while let p = queue.popLast() {
      guard out[p] == nil else { continue }
      let info = try fx.narInfo(p)
      out[p] = ValidPath(
        path: p, narHash: info.narHash, narSize: info.narSize, references: info.references, deriver: info.deriver,
        signatures: info.signatures.map(\.description), ca: info.ca)
      queue += info.references
    }
    return Array(out.values)
  }

  /// Rows of `ValidPaths` (less id, registrationTime and ultimate) and `Refs` (as path pairs) for
  /// `paths`, from a database file, through Python's sqlite3.
  func rows(_ db: String, _ paths: [String]) throws -> (valid: [[String]], refs: [[String]], times: [Int]) {
    let script = """
      import json, sqlite3, sys
      db = sqlite3.connect("file:" + sys.argv[1] + "?immutable=1", uri=True)
      paths = json.loads(sys.argv[2])
      q = ",".join("?" * len(paths))
      valid = [[str(c) for c in r] for r in db.execute(
          f"select path, hash, deriver, narSize, sigs, ca from ValidPaths where path in ({q}) order by path", paths)]
      refs = [list(r) for r in db.execute(
          f"select a.path, b.path from Refs join ValidPaths a on a.id = referrer join ValidPaths b on b.id = reference where a.path in ({q}) order by 1, 2", paths)]
      times = [r[0] for r in db.execute(f"select registrationTime from ValidPaths where path in ({q})", paths)]
      print(json.dumps({"valid": valid, "refs": refs, "times": times}))
      """
    let out = try run(["python3", "-c", script, db, String(decoding: try JSONEncoder().encode(paths), as: UTF8.self)])
    struct Rows: Decodable {
      var valid: [[String]]
      var refs: [[String]]
      var times: [Int]
    }
    let r = try JSONDecoder().decode(Rows.self, from: Data(out.stdout))
    return (r.valid, r.refs, r.times)
  }

  @Test func theDatabaseHoldsWhatNixWrote() throws {
    let tmp = try TemporaryDirectory("nixdb")
    let closure = try closure()
    #expect(closure.count == 3)
    let file = tmp.sub("db.sqlite")
    let now = Date()
    try NixDatabase.write(closure, to: file, registrationTime: Int64(now.timeIntervalSince1970))
    let paths = closure.map(\.path.path).sorted()
    let ours = try rows(file, paths)
    let nixs = try rows("\(fx.nix.store)/nix/var/nix/db/db.sqlite", paths)
    #expect(ours.valid.count == 3)
    #expect(ours.valid == nixs.valid, "ours: \(ours.valid)\nNix's: \(nixs.valid)")
    #expect(ours.refs == nixs.refs && !ours.refs.isEmpty, "ours: \(ours.refs)\nNix's: \(nixs.refs)")
    #expect(ours.times.allSatisfy { $0 == Int(now.timeIntervalSince1970) })
    // The columns that would say it was built here are empty: it was substituted.
    let ultimate = try run(["python3", "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from ValidPaths where ultimate is not null').fetchone()[0])", file]).trimmed
    #expect(ultimate == "0")
  }

  @Test func aClosureThatIsNotClosedIsRefused() throws {
    let tmp = try TemporaryDirectory("nixdb-open")
    let partial = try closure().filter { $0.path.name != "busybox" }
    #expect(throws: NixStateError.self) { try NixDatabase.write(partial, to: tmp.sub("db.sqlite"), registrationTime: 0) }
  }

  /// The layer: what Nix's local store expects under /nix/var/nix, made once per closure.
  @Test func theLayerHoldsWhatNixExpectsAndIsSharedByClosure() throws {
    let tmp = try TemporaryDirectory("nixstate")
    let closure = try closure()
    let app = fx.paths["app"]!
    let layer = try StateLayer.ensure(stateDir: tmp.path, result: app, closure: closure)
    let fm = FileManager.default
    for dir in ["store/.links", "var/nix/db", "var/nix/gcroots/per-user", "var/nix/profiles/per-user", "var/nix/temproots"] {
      var isDir: ObjCBool = false
      #expect(fm.fileExists(atPath: "\(layer)/\(dir)", isDirectory: &isDir) && isDir.boolValue, "\(dir)")
    }
    #expect(try fm.destinationOfSymbolicLink(atPath: "\(layer)/var/nix/gcroots/result") == "/nix/var/result")
    #expect(try String(contentsOfFile: "\(layer)/var/nix/db/schema", encoding: .utf8) == "10")
    #expect((try fm.attributesOfItem(atPath: "\(layer)/var/nix/db/reserved")[.size] as? Int) == 8 << 20)
    // The same closure: the same layer, not made again.
    let before = try fm.attributesOfItem(atPath: "\(layer)/var/nix/db/db.sqlite")[.modificationDate] as? Date
    #expect(try StateLayer.ensure(stateDir: tmp.path, result: app, closure: closure) == layer)
    #expect(try fm.attributesOfItem(atPath: "\(layer)/var/nix/db/db.sqlite")[.modificationDate] as? Date == before)
    // Another closure: another layer; unused layers go.
    let lib = fx.paths["lib"]!
    let other = try StateLayer.ensure(stateDir: tmp.path, result: lib, closure: closure.filter { $0.path != app })
    #expect(other != layer)
    #expect(StateLayer.removeUnused(stateDir: tmp.path, keep: [layer]) == [other])
    #expect(fm.fileExists(atPath: layer) && !fm.fileExists(atPath: other))
  }
}
