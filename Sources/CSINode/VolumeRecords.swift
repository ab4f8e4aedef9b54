import Foundation

/// A published volume, recorded in the state directory so a restarted plugin can reconcile.
struct VolumeRecord: Codable, Equatable {
  var volumeID: String
  var targetPath: String
  var storePath: String
  /// The attributes the volume was published with, to tell a retry from a conflicting request.
  var attributes: [String: String]
}

/// `<state-dir>/csi-volumes.json`, rewritten atomically on every change.
final class VolumeRecords: @unchecked Sendable {
  let file: String
  let lock = NSLock()
  private var records: [String: VolumeRecord] = [:]

  init(stateDir: String) {
    file = (stateDir as NSString).appendingPathComponent("csi-volumes.json")
    if let data = FileManager.default.contents(atPath: file),
      let list = try? JSONDecoder().decode([VolumeRecord].self, from: data)
    {
      for r in list { records[r.volumeID] = r }
    }
  }

  var all: [VolumeRecord] { lock.withLock { Array(records.values) } }

  func get(_ id: String) -> VolumeRecord? { lock.withLock { records[id] } }

  func byTarget(_ target: String) -> VolumeRecord? {
    lock.withLock { records.values.first { $0.targetPath == target } }
  }

  func put(_ r: VolumeRecord) throws {
    try lock.withLock {
      records[r.volumeID] = r
      try save()
    }
  }

  func remove(_ id: String) throws {
    try lock.withLock {
      records[id] = nil
      try save()
    }
  }

  private func save() throws {
    let data = try JSONEncoder().encode(records.values.sorted { $0.volumeID < $1.volumeID })
    try data.write(to: URL(fileURLWithPath: file), options: .atomic)
  }
}
