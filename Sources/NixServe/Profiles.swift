import BinaryCache
import ChunkStore
import Foundation
import Logging
import Synchronization

/// Merged startup profiles, one per store path that pods were started from: the union of the
/// chunks nodes report their pods read first, in first-read order, bounded. Anyone may report
/// (nodes hold no credentials), so a report keeps only chunks this serve holds, and a profile
/// only ever chooses what nodes prefetch: they check every chunk, and fetch only chunks their own
/// paths lack. Kept as `<state-dir>/profiles/<hash part>.json`.
public final class StartupProfiles: Sendable {
  let directory: String
  let store: ChunkStore
  let logger: Logger
  private let profiles = Mutex<[String: StartupProfile]>([:])

  public init(stateDirectory: String, store: ChunkStore, logger: Logger) throws {
    directory = stateDirectory + "/profiles"
    try FileManager.default.createDirectory(
      atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    self.store = store
    self.logger = logger
  }

  func file(_ hashPart: String) -> String { "\(directory)/\(hashPart).json" }

  public func get(_ hashPart: String) -> StartupProfile? {
    if let p = profiles.withLock({ $0[hashPart] }) { return p }
    guard let p = load(hashPart) else { return nil }
    profiles.withLock { $0[hashPart] = p }
    return p
  }

  private func load(_ hashPart: String) -> StartupProfile? {
    FileManager.default.contents(atPath: file(hashPart)).flatMap { try? JSONDecoder().decode(StartupProfile.self, from: $0) }
  }

  /// Merges a node's report; returns how many entries the profile has now.
  public func merge(_ report: StartupProfile, into hashPart: String) throws -> Int {
    let held = report.entries.prefix(StartupProfile.limit).filter { entry in
      guard let id = ChunkID(hex: entry.hex) else { return false }
      return (try? store.withStoredChunk(id) { chunk, _ in chunk.size == entry.size }) == true
    }
    return try profiles.withLock { table -> Int in
      var merged = table[hashPart] ?? load(hashPart) ?? StartupProfile(chunks: [])
      var seen = Set(merged.entries.map(\.hex))
      for entry in held where merged.chunks.count < StartupProfile.limit && seen.insert(entry.hex).inserted {
        merged.chunks.append([entry.hex, String(entry.size)])
      }
      let data = try JSONEncoder().encode(merged)
      let tmp = file(hashPart) + ".tmp"
      try data.write(to: URL(fileURLWithPath: tmp))
      guard rename(tmp, file(hashPart)) == 0 else { throw CocoaError(.fileWriteUnknown) }
      table[hashPart] = merged
      return merged.chunks.count
    }
  }
}
