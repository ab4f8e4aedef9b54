import Foundation

/// A `.ls` listing: the tree of a NAR with sizes and offsets, no contents and no hashes.
public indirect enum NarListing: Hashable, Sendable {
  case directory([String: NarListing])
  case regular(size: UInt64, executable: Bool, narOffset: UInt64?)
  case symlink(target: String)

  public init(parsing data: Data, source: String = "listing") throws(NarListingError) {
    let json: Any
    do { json = try JSONSerialization.jsonObject(with: data) } catch {
      throw NarListingError(source: source, reason: "not JSON: \(error.localizedDescription)")
    }
    guard let top = json as? [String: Any], (top["version"] as? NSNumber)?.intValue == 1,
      let root = top["root"]
    else { throw NarListingError(source: source, reason: "expected {\"version\":1,\"root\":…}") }
    self = try Self.node(root, source: source, path: "/")
  }

  static func node(_ any: Any, source: String, path: String) throws(NarListingError) -> NarListing {
    guard let o = any as? [String: Any], let type = o["type"] as? String else {
      throw NarListingError(source: source, reason: "\(path): node without a type")
    }
    switch type {
    case "directory":
      var entries: [String: NarListing] = [:]
      for (name, child) in (o["entries"] as? [String: Any]) ?? [:] {
        entries[name] = try node(child, source: source, path: path == "/" ? "/\(name)" : "\(path)/\(name)")
      }
      return .directory(entries)
    case "regular":
      guard let size = (o["size"] as? NSNumber)?.uint64Value else {
        throw NarListingError(source: source, reason: "\(path): regular file without a size")
      }
      return .regular(
        size: size, executable: (o["executable"] as? Bool) ?? false,
        narOffset: (o["narOffset"] as? NSNumber)?.uint64Value)
    case "symlink":
      guard let target = o["target"] as? String else {
        throw NarListingError(source: source, reason: "\(path): symlink without a target")
      }
      return .symlink(target: target)
    default:
      throw NarListingError(source: source, reason: "\(path): unknown type '\(type)'")
    }
  }
}

public struct NarListingError: Error, Hashable, Sendable, CustomStringConvertible {
  public let source: String
  public let reason: String
  public var description: String { "malformed listing \(source): \(reason)" }
}
