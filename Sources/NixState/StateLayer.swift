// The part of a "fully functional /nix" that is not the store: Nix's database for the closure and
// the directories Nix's local store expects under /nix/var/nix, laid out as a layer over a view
// (var/nix/..., store/.links). Made once per closure and shared by every volume of it; never
// changed once made (overlayfs requires that of a lower layer).
import Crypto
import Foundation
import NixFormats

#if canImport(Glibc)
  import Glibc
#endif

public enum StateLayer {
  /// The directory of the layers, under a state directory.
  public static func root(stateDir: String) -> String { (stateDir as NSString).appendingPathComponent("nix-state") }

  /// What names a layer: the result and its closure, each with its NarHash (another build of a
  /// path is another database).
  public static func key(result: StorePath, closure: [ValidPath]) -> String {
    var h = SHA256()
    h.update(data: Array("nixfs-state-1 \(result.path)\n".utf8))
    for p in closure.sorted(by: { $0.path.path < $1.path.path }) {
      h.update(data: Array("\(p.path.path) \(p.narHash.nix32)\n".utf8))
    }
    return h.finalize().prefix(16).map { String(format: "%02x", $0) }.joined()
  }

  /// Nix's reserved-space file (`gc-reserved-space`, 8 MiB by default): present at that size,
  /// Nix leaves it alone instead of writing 8 MiB into every read-write volume.
  static let reservedSize: off_t = 8 << 20

  /// The layer of `closure` (made now if it is not there yet), as a directory holding
  /// `var/nix/{db,gcroots,profiles,temproots}` and `store/.links`. Made beside and renamed into
  /// place, so a crash or a concurrent publish of the same closure leaves one whole layer.
  public static func ensure(
    stateDir: String, result: StorePath, closure: [ValidPath], now: Date = Date()
  ) throws(NixStateError) -> String {
    let root = root(stateDir: stateDir)
    let final = (root as NSString).appendingPathComponent(key(result: result, closure: closure))
    if FileManager.default.fileExists(atPath: final + "/var/nix/db/schema") { return final }
    let temporary = "\(final).new-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    func fail(_ operation: String, _ path: String) -> NixStateError {
      NixStateError(path: path, operation: operation, message: String(cString: strerror(errno)))
    }
    do {
      try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
      let nix = temporary + "/var/nix"
      for dir in [
        "/store/.links", "/var/nix/db", "/var/nix/gcroots/per-user", "/var/nix/profiles/per-user", "/var/nix/temproots",
      ] {
        try FileManager.default.createDirectory(atPath: temporary + dir, withIntermediateDirectories: true)
      }
      // As Nix makes them: the result is a GC root (a pod's own `nix-store --gc` keeps the closure),
      // and the profiles are reachable from the roots.
      try FileManager.default.createSymbolicLink(atPath: nix + "/gcroots/result", withDestinationPath: "/nix/var/result")
      try FileManager.default.createSymbolicLink(atPath: nix + "/gcroots/profiles", withDestinationPath: "/nix/var/nix/profiles")
      try "\(NixDatabase.schemaVersion)".write(toFile: nix + "/db/schema", atomically: false, encoding: .utf8)
      _ = FileManager.default.createFile(atPath: nix + "/db/big-lock", contents: nil)
      let reserved = open(nix + "/db/reserved", O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
      guard reserved >= 0, ftruncate(reserved, reservedSize) == 0 else { throw fail("create", nix + "/db/reserved") }
      close(reserved)
    } catch let e as NixStateError {
      try? FileManager.default.removeItem(atPath: temporary)
      throw e
    } catch {
      try? FileManager.default.removeItem(atPath: temporary)
      throw NixStateError(path: temporary, operation: "create", message: "\(error)")
    }
    do {
      try NixDatabase.write(closure, to: temporary + "/var/nix/db/db.sqlite", registrationTime: Int64(now.timeIntervalSince1970))
    } catch {
      try? FileManager.default.removeItem(atPath: temporary)
      throw error
    }
    if rename(temporary, final) != 0 {
      let e = errno
      try? FileManager.default.removeItem(atPath: temporary)
      // Another publish of the same closure made it first.
      if e == EEXIST || e == ENOTEMPTY { return final }
      errno = e
      throw fail("rename into place", final)
    }
    return final
  }

  /// Removes the layers under `stateDir` that are not in `keep` (paths as `ensure` returned them),
  /// and leftovers of interrupted makes. Returns the removed ones.
  @discardableResult
  public static func removeUnused(stateDir: String, keep: Set<String>) -> [String] {
    let root = root(stateDir: stateDir)
    let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
    var removed: [String] = []
    for name in names {
      let path = (root as NSString).appendingPathComponent(name)
      guard !keep.contains(path) else { continue }
      if (try? FileManager.default.removeItem(atPath: path)) != nil { removed.append(path) }
    }
    return removed
  }
}
