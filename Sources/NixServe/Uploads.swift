import BinaryCache
import ChunkStore
import Foundation
import Threads
import Logging
import NixFormats

/// Who may upload, from `--upload-credentials-file`: one credential a line, `bearer TOKEN` or
/// `USER:PASSWORD` (HTTP basic, what Nix sends from its netrc file); `#` starts a comment.
public struct UploadCredentials: Sendable {
  let bearer: Set<String>
  let basic: Set<String>

  public init(file: String) throws {
    var bearer = Set<String>()
    var basic = Set<String>()
    let text = try String(contentsOfFile: file, encoding: .utf8)
    for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
      let line = raw.trimmingCharacters(in: .whitespaces)
      if line.isEmpty || line.hasPrefix("#") { continue }
      if line.lowercased().hasPrefix("bearer ") {
        bearer.insert(String(line.dropFirst(7)).trimmingCharacters(in: .whitespaces))
      } else if line.contains(":") {
        basic.insert(Data(line.utf8).base64EncodedString())
      } else {
        throw ServeError.badRequest("\(file) line \(n + 1): expected 'bearer TOKEN' or 'USER:PASSWORD'")
      }
    }
    guard !bearer.isEmpty || !basic.isEmpty else { throw ServeError.badRequest("\(file): no credentials") }
    self.bearer = bearer
    self.basic = basic
  }

  /// Whether an `Authorization` header value grants uploads.
  public func allows(_ header: String?) -> Bool {
    guard let header, let space = header.firstIndex(of: " ") else { return false }
    let scheme = header[..<space].lowercased()
    let value = header[header.index(after: space)...].trimmingCharacters(in: .whitespaces)
    switch scheme {
    case "bearer": return bearer.contains(value)
    case "basic": return basic.contains(value)
    default: return false
    }
  }
}

/// The upload side of `nixfs serve`: what `nix copy --to http://…` sends. Nix PUTs the NAR file
/// first, then the narinfo that describes it; the NAR waits in `<state>/uploads/` until its narinfo
/// arrives, and the path becomes visible only once the narinfo is signed by a trusted key and the
/// NAR verified against it (the same checks as a download: FileSize, FileHash, size bound,
/// NarSize, NarHash, a strict parse) and committed. Anything else uploaded (`.ls` listings, build
/// logs) is accepted and dropped: the serve makes its own.
public final class UploadArea: Sendable {
  public let directory: String
  public let maxBytes: UInt64
  let cache: PullThroughCache
  let trusted: TrustedKeys
  let requireSignatures: Bool
  let logger: Logger

  public init(
    stateDirectory: String, cache: PullThroughCache, trustedKeys: [String], requireSignatures: Bool,
    maxBytes: UInt64, logger: Logger
  ) throws {
    directory = (stateDirectory as NSString).appendingPathComponent("uploads")
    try FileManager.default.createDirectory(
      atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    // A NAR whose narinfo never came (a client that died) is not kept across restarts.
    for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
      try? FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent(name))
    }
    self.cache = cache
    self.trusted = try TrustedKeys(parsing: trustedKeys)
    self.requireSignatures = requireSignatures
    self.maxBytes = maxBytes
    self.logger = logger
  }

  /// `nar/<name>` as Nix names NAR files: letters, digits and dots, nothing that could leave the
  /// upload directory.
  static func narFileName(_ name: String) -> String? {
    let ok = name.utf8.count <= 200 && !name.hasPrefix(".")
      && name.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x7a) || $0 == 0x2e }
    return ok && name.contains(".nar") ? name : nil
  }

  /// Where an uploaded NAR file waits; nil for a name that is not a NAR file's.
  func pendingPath(_ name: String) -> String? {
    Self.narFileName(name).map { (directory as NSString).appendingPathComponent($0) }
  }

  /// Stores one uploaded NAR file (written to a temporary name, renamed when complete).
  public func receiveNAR<Body: AsyncSequence>(name: String, body: Body) async throws(ServeError)
  where Body.Element: Collection, Body.Element.Element == UInt8 {
    guard let final = pendingPath(name) else { throw .badRequest("'\(LogText.bounded(name))' is not a NAR file name") }
    let temp = final + ".part-\(UUID().uuidString.prefix(8))"
    guard FileManager.default.createFile(atPath: temp, contents: nil, attributes: [.posixPermissions: 0o600]),
      let handle = FileHandle(forWritingAtPath: temp)
    else { throw .store("cannot create \(temp)") }
    var size: UInt64 = 0
    do {
      defer { try? handle.close() }
      for try await piece in body {
        size += UInt64(piece.count)
        guard size <= maxBytes else {
          throw ServeError.badRequest("upload of \(name) is over the limit of \(maxBytes) bytes")
        }
        try handle.write(contentsOf: Data(piece))
      }
    } catch {
      try? FileManager.default.removeItem(atPath: temp)
      throw (error as? ServeError) ?? .badRequest("upload of \(name) failed: \(error)")
    }
    guard rename(temp, final) == 0 else {
      try? FileManager.default.removeItem(atPath: temp)
      throw .store("cannot rename \(temp): \(String(cString: strerror(errno)))")
    }
  }

  /// A narinfo upload: checked, and the NAR it names verified and committed; then the path is
  /// served like any other.
  public func receiveNarInfo(hashPart: String, text: String) async throws(ServeError) -> StorePath {
    let info: NarInfo
    do { info = try NarInfo(parsing: text, source: "uploaded \(hashPart).narinfo") } catch {
      throw .badRequest("\(error)")
    }
    guard info.storePath.hashPart == hashPart else {
      throw .badRequest("the narinfo is for \(info.storePath), not \(hashPart)")
    }
    if requireSignatures {
      do { _ = try info.verify(trusting: trusted) } catch { throw .forbidden("\(error)") }
    }
    if cache.store.isComplete(info.storePath) { return info.storePath }
    guard info.url.hasPrefix("nar/"), let file = pendingPath(String(info.url.dropFirst(4))),
      FileManager.default.fileExists(atPath: file)
    else { throw .badRequest("\(info.storePath): its NAR \(LogText.bounded(info.url)) was not uploaded first") }
    defer { try? FileManager.default.removeItem(atPath: file) }
    do throws(ServeError) {
      try await cache.ingest(info, narFile: file, source: "upload \(info.url)")
    } catch {
      logger.warning("upload refused", metadata: ["path": "\(info.storePath)", "error": "\(error)"])
      throw error
    }
    cache.forgetMiss(hashPart: hashPart)
    cache.counters.uploads.increment()
    logger.info("uploaded", metadata: ["path": "\(info.storePath)", "narSize": "\(info.narSize)"])
    return info.storePath
  }
}

extension PullThroughCache {
  /// Verifies an uncompressed NAR file against `info` (the same checks as a download: sizes,
  /// NarHash, a strict parse) into an ingest of the store, and commits it. Uploads and builds
  /// enter the store this way.
  func ingest(_ info: NarInfo, narFile file: String, source: String) async throws(ServeError) {
    let ingest: Ingest
    do { ingest = try store.ingest(info) } catch { throw .store("\(error)") }
    do {
      try await store.async.run { _ in
        let data = try Data(contentsOf: URL(fileURLWithPath: file), options: .alwaysMapped)
        try data.withUnsafeBytes { raw in
          try BinaryCacheClient.verifyNARFile(raw, info: info, source: source, into: ingest)
        }
        _ = try ingest.commit()
      }
    } catch {
      ingest.abort()
      throw .badRequest("\(info.storePath): \(error)")
    }
  }
}
