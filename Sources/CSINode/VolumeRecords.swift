import Foundation
import Synchronization

/// A published volume, recorded in the state directory so a restarted plugin can reconcile.
struct VolumeRecord: Codable, Equatable {
  var volumeID: String
  var targetPath: String
  var storePath: String
  /// The attributes the volume was published with, to tell a retry from a conflicting request.
  var attributes: [String: String]
  /// Nil in records of plugins older than read-write volumes: those were all read-only.
  var readOnly: Bool? = nil
  /// The closure's Nix state layer the volume shows (kept while any volume uses it).
  var nixState: String? = nil

  var isReadOnly: Bool { readOnly ?? true }
}

/// `<state-dir>/csi-volumes.json`, rewritten atomically on every change.
final class VolumeRecords: Sendable {
  let file: String
  private let records: Mutex<[String: VolumeRecord]>

  init(stateDir: String) {
    file = (stateDir as NSString).appendingPathComponent("csi-volumes.json")
    var loaded: [String: VolumeRecord] = [:]
    if let data = FileManager.default.contents(atPath: file),
      let list = try? JSONDecoder().decode([VolumeRecord].self, from: data)
    {
      for r in list { loaded[r.volumeID] = r }
    }
    records = Mutex(loaded)
  }

  var all: [VolumeRecord] { records.withLock { Array($0.values) } }

  func get(_ id: String) -> VolumeRecord? { records.withLock { $0[id] } }

  func byTarget(_ target: String) -> VolumeRecord? {
    records.withLock { $0.values.first { $0.targetPath == target } }
  }

  func put(_ r: VolumeRecord) throws {
    try records.withLock {
      $0[r.volumeID] = r
      try save($0)
    }
  }

  func remove(_ id: String) throws {
    try records.withLock {
      $0[id] = nil
      try save($0)
    }
  }

  private func save(_ records: [String: VolumeRecord]) throws {
    let data = try JSONEncoder().encode(records.values.sorted { $0.volumeID < $1.volumeID })
    try data.write(to: URL(fileURLWithPath: file), options: .atomic)
  }
}
