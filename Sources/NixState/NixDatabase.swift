// Nix's database (`/nix/var/nix/db/db.sqlite`) for a closure, as Nix would have written it after
// substituting those paths: generated from the narinfos nixfs already holds, with no Nix on the node.
import Foundation
import NixFormats
import SQLiteDatabase

/// One row of Nix's `ValidPaths`, with its references: what a narinfo says of a path.
public struct ValidPath: Sendable, Hashable {
  public var path: StorePath
  public var narHash: NixHash
  public var narSize: UInt64
  public var references: [StorePath]
  /// As a narinfo gives it: a base name, or a full path.
  public var deriver: String?
  public var signatures: [String]
  public var ca: String?

  public init(
    path: StorePath, narHash: NixHash, narSize: UInt64, references: [StorePath], deriver: String?,
    signatures: [String], ca: String?
  ) {
    (self.path, self.narHash, self.narSize, self.references) = (path, narHash, narSize, references)
    (self.deriver, self.signatures, self.ca) = (deriver, signatures, ca)
  }
}

/// Why a database or state directory could not be made: which file, what was being done.
public struct NixStateError: Error, Sendable, CustomStringConvertible, SQLiteFailure {
  public let path: String
  public let operation: String
  public let message: String

  public init(path: String, operation: String, message: String) {
    (self.path, self.operation, self.message) = (path, operation, message)
  }

  public static func sqlite(path: String, operation: String, message: String) -> NixStateError {
    NixStateError(path: path, operation: operation, message: message)
  }

  public var description: String { "Nix state \(path): \(operation): \(message)" }
}

public enum NixDatabase {
  /// Nix's schema version since 2.0: the text of `db/schema`.
  public static let schemaVersion = 10

  /// The tables Nix's local store creates (the schema of Nix 2.8 to 2.34), and the migrations table
  /// later versions create on every open, even read-only, so they find it here.
  static let schema = """
    create table if not exists ValidPaths (
      id integer primary key autoincrement not null,
      path text unique not null,
      hash text not null,
      registrationTime integer not null,
      deriver text,
      narSize integer,
      ultimate integer,
      sigs text,
      ca text
    );
    create table if not exists Refs (
      referrer integer not null,
      reference integer not null,
      primary key (referrer, reference),
      foreign key (referrer) references ValidPaths(id) on delete cascade,
      foreign key (reference) references ValidPaths(id) on delete restrict
    );
    create index if not exists IndexReferrer on Refs(referrer);
    create index if not exists IndexReference on Refs(reference);
    create trigger if not exists DeleteSelfRefs before delete on ValidPaths
      begin
        delete from Refs where referrer = old.id and reference = old.id;
      end;
    create table if not exists DerivationOutputs (
      drv integer not null,
      id text not null,
      path text not null,
      primary key (drv, id),
      foreign key (drv) references ValidPaths(id) on delete cascade
    );
    create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
    create table if not exists SchemaMigrations (migration text primary key not null);
    """

  /// Writes a new database at `file` holding exactly `paths`, which must be closed under their
  /// references. Columns as Nix writes them: the full path, `sha256:` and base16, Unix seconds,
  /// the deriver's full path, the signatures joined by spaces; empty values NULL; `ultimate` NULL
  /// (substituted, not built here). Rollback journal: Nix switches it to WAL on its first
  /// read-write open, and a read-only opener needs no `-shm`.
  public static func write(_ paths: [ValidPath], to file: String, registrationTime: Int64) throws(NixStateError) {
    let members = Set(paths.map(\.path))
    for p in paths {
      if let missing = p.references.first(where: { !members.contains($0) }) {
        throw NixStateError(path: file, operation: "register \(p.path)", message: "its reference \(missing) is not in the closure")
      }
    }
    let db = try Database<NixStateError>(path: file)
    // A new file in a directory that is renamed into place only once whole: no journal and no
    // sync (they cost a publish tens of milliseconds). Only a power loss could tear it, and the
    // CSI plugin removes every layer of volumes a reboot unmounted (all of them) at its start.
    try db.exec("pragma foreign_keys = 1; pragma journal_mode = off; pragma synchronous = off;")
    do {
      try db.transaction {
        try db.exec(schema)
        var ids: [StorePath: Int64] = [:]
        let insert = try db.prepare(
          "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, sigs, ca) values (?, ?, ?, ?, ?, ?, ?)")
        for p in paths.sorted(by: { $0.path.path < $1.path.path }) {
          insert.again()
          insert.set(1, p.path.path)
          insert.set(2, "\(p.narHash.algorithm.rawValue):\(p.narHash.hex)")
          insert.set(3, registrationTime)
          if let d = deriver(p) { insert.set(4, d) } else { insert.setNull(4) }
          insert.set(5, p.narSize)
          if p.signatures.isEmpty { insert.setNull(6) } else { insert.set(6, p.signatures.joined(separator: " ")) }
          if let ca = p.ca, !ca.isEmpty { insert.set(7, ca) } else { insert.setNull(7) }
          try insert.run()
          ids[p.path] = db.lastInsertRowID
        }
        let ref = try db.prepare("insert or ignore into Refs (referrer, reference) values (?, ?)")
        for p in paths {
          for r in p.references {
            ref.again()
            ref.set(1, ids[p.path]!)
            ref.set(2, ids[r]!)
            try ref.run()
          }
        }
      }
    } catch let e as NixStateError {
      throw e
    } catch {
      throw NixStateError(path: file, operation: "write", message: "\(error)")
    }
  }

  /// The deriver as Nix's column holds it: a full path.
  static func deriver(_ p: ValidPath) -> String? {
    guard let d = p.deriver, !d.isEmpty, d != "unknown-deriver" else { return nil }
    return d.hasPrefix("/") ? d : "\(p.path.storeDir)/\(d)"
  }
}
