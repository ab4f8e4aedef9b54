import Foundation

/// The record of a FUSE connection that one daemon hands the next (takeover, or through the
/// keeper after a crash); StoreFS/Handover.swift tells how it is used.
public struct Handover: Codable, Sendable, Equatable {
  /// Bumped when the record, the journal or the meaning of node ids changes incompatibly.
  public static let currentFormat = 1

  public var format: Int
  public var version: String
  /// Names this connection (and its kernel-view journal) for as long as it lives.
  public var connection: String
  /// The kernel's FUSE_INIT request, as its first daemon read it.
  public var initRequest: Data
  public var mountpoint: String

  public init(format: Int = Handover.currentFormat, version: String, connection: String, initRequest: Data, mountpoint: String) {
    self.format = format
    self.version = version
    self.connection = connection
    self.initRequest = initRequest
    self.mountpoint = mountpoint
  }
}
