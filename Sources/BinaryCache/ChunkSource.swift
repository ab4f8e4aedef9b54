// The client side of the chunk index wire format (Documentation/serve.md, "Chunk index v1"):
// signed documents by NarHash and chunks by digest, from substituters that announce them. Nothing
// here is believed: the chunk store checks documents against trusted keys and chunks against
// their digests.
import Foundation
import Threads
import NixFormats

/// Names of the chunk index wire format.
public enum ChunkIndexWire {
  /// The version this client speaks, as announced in `nix-cache-info` (`NixfsChunkIndex:`).
  public static let prefix = NixfsWire.version
  /// The largest document accepted (a path of millions of files is well under it).
  public static let documentLimit = 256 << 20
}

/// One chunk as a substituter sent it: its stored form, unchecked.
public struct FetchedChunk: Sendable {
  /// One zstd frame (`X-Nixfs-Encoding: zstd`), else the bytes themselves.
  public let zstd: Bool
  public let bytes: [UInt8]
  /// Where it came from, for error messages.
  public let url: String
}

/// What one `POST nixfs/v1/chunks` brought: the frames that arrived whole, and why it ended early.
public struct ChunkBatchAnswer: Sendable {
  public let url: String
  public let frames: [NixfsWire.ChunkBatch.Frame]
  public let failure: CacheError?
}

extension BinaryCacheClient {
  /// The substituters that offer chunk indexes, best first.
  public func chunkSources() async -> [Substituter] {
    await substituters().filter { $0.chunkIndex != nil }
  }

  /// The chunk index document for the NAR of `info`, from the substituter that served the narinfo
  /// when it offers chunk indexes. Nil when it does not, or has no document for this NAR (404).
  public func chunkIndexDocument(for info: CachedPathInfo) async throws(CacheError) -> Data? {
    guard info.substituter.chunkIndex != nil else { return nil }
    let url =
      "\(info.substituter.url)/\(NixfsWire.Route.manifest(narHashDigest: info.info.narHash.nix32Digest, hashPart: info.info.storePath.hashPart))"
    return try await fetchBytes(url, limit: ChunkIndexWire.documentLimit).map { Data($0.bytes) }
  }

  /// The chunk named `hexDigest` from `source`, whose uncompressed size is `size`: nil when the
  /// source does not have it. The body is bounded by what `size` bytes can take compressed.
  public func fetchChunk(_ hexDigest: String, size: Int, from source: Substituter) async throws(CacheError) -> FetchedChunk? {
    let url = "\(source.url)/\(NixfsWire.Route.chunk(hex: hexDigest))"
    // zstd's worst case is the input plus a small frame overhead.
    let limit = size + size / 128 + (64 << 10)
    guard let (bytes, headers) = try await fetchBytes(url, limit: limit) else { return nil }
    let encoding = headers[NixfsWire.Header.encoding.lowercased()] ?? "identity"
    guard encoding == "zstd" || encoding == "identity" else {
      throw .decompression(url: url, compression: encoding, reason: "unknown X-Nixfs-Encoding")
    }
    return FetchedChunk(zstd: encoding == "zstd", bytes: bytes, url: url)
  }

  /// The chunks `refs` names (hex digest, uncompressed size) from `source` in one request
  /// (`POST nixfs/v1/chunks`), as their frames arrive; nil when the source has no batch route (an
  /// older serve). What arrived before a failure is in the answer with the failure: a cut-off
  /// stream loses none of it. Nothing here is believed; the store checks each chunk.
  public func fetchChunkBatch(_ refs: [(hex: String, size: Int)], from source: Substituter) async -> ChunkBatchAnswer? {
    let url = "\(source.url)/\(NixfsWire.chunkBatchRoute)"
    let largest = refs.map(\.size).max() ?? 0
    let limit = largest + largest / 128 + (64 << 10)
    let total = refs.reduce(0) { $0 + $1.size + $1.size / 128 + NixfsWire.ChunkBatch.headerSize } + (64 << 10)
    let state = Locked((parser: NixfsWire.ChunkBatch.Parser(limit: limit), frames: [NixfsWire.ChunkBatch.Frame](), bytes: 0))
    do {
      let head = try await transport.get(
        url, post: NixfsWire.ChunkBatch.request(refs.map(\.hex)),
        onStart: { _ in },
        onData: { bytes in
          try state.withLock { s in
            s.bytes += bytes.count
            guard s.bytes <= total else {
              throw CacheError.sizeMismatch(url: url, field: "size limit", expected: UInt64(total), actual: UInt64(s.bytes))
            }
            do throws(NixfsWire.ChunkBatch.Malformed) {
              s.frames += try s.parser.feed(bytes)
            } catch {
              throw CacheError.decompression(url: url, compression: "chunk batch", reason: error.reason)
            }
          }
        })
      if [404, 405, 501].contains(head.status) { return nil }
      guard head.isSuccess else {
        return ChunkBatchAnswer(url: url, frames: [], failure: .httpStatus(url: url, status: head.status, attempts: 1))
      }
      let got = state.withLock { $0 }
      let failure: CacheError? =
        got.parser.pending > 0
        ? .decompression(url: url, compression: "chunk batch", reason: "cut off inside a frame after \(got.bytes) bytes") : nil
      return ChunkBatchAnswer(url: url, frames: got.frames, failure: failure)
    } catch {
      return ChunkBatchAnswer(url: url, frames: state.withLock { $0.frames }, failure: error)
    }
  }

  /// GETs a bounded body with retries; nil on 404 (or 403, as S3 answers for absent keys).
  func fetchBytes(_ url: String, limit: Int) async throws(CacheError) -> (bytes: [UInt8], headers: [String: String])? {
    try await withRetries(url) { () async throws(CacheError) -> ([UInt8], [String: String])? in
      let buffer = Locked<[UInt8]>([])
      let head = try await transport.get(
        url,
        onStart: { _ in buffer.withLock { $0.removeAll() } },
        onData: { bytes in
          try buffer.withLock {
            guard $0.count + bytes.count <= limit else {
              throw CacheError.sizeMismatch(
                url: url, field: "size limit", expected: UInt64(limit), actual: UInt64($0.count + bytes.count))
            }
            $0.append(contentsOf: bytes)
          }
        })
      if head.status == 404 || head.status == 403 { return nil }
      guard head.isSuccess else { throw .httpStatus(url: url, status: head.status, attempts: 1) }
      return (buffer.withLock { $0 }, head.headers)
    }
  }
}

/// Startup profiles (`nixfs/v1/profiles/<hash part>`): which chunks pods of a store path read
/// first, merged by the serve from what nodes report. Only a hint: it chooses what to prefetch.
public struct StartupProfile: Codable, Sendable, Equatable {
  public var version = 1
  /// `[chunk SHA-256 hex, uncompressed size]`, in the order they were first read.
  public var chunks: [[String]]
  public init(chunks: [(hex: String, size: Int)]) { self.chunks = chunks.map { [$0.hex, String($0.size)] } }

  /// The entries that are well formed.
  public var entries: [(hex: String, size: Int)] {
    chunks.compactMap { c in
      guard c.count == 2, c[0].utf8.count == 64, let size = Int(c[1]), size > 0 else { return nil }
      return (c[0], size)
    }
  }

  /// The largest profile sent or taken (entries).
  public static let limit = 65_536
}

extension BinaryCacheClient {
  /// The startup profile of `path` from `source`, or nil when it has none or cannot be asked.
  public func startupProfile(of path: StorePath, from source: Substituter) async -> StartupProfile? {
    let url = "\(source.url)/\(NixfsWire.Route.profile(hashPart: path.hashPart))"
    do {
      guard let got = try await fetchBytes(url, limit: 16 << 20) else { return nil }
      return try JSONDecoder().decode(StartupProfile.self, from: Data(got.bytes))
    } catch {
      logger.debug("no usable startup profile", metadata: ["url": "\(url)", "error": "\(error)"])
      return nil
    }
  }

  /// Reports the chunks pods of `path` read first, for `source` to merge into its profile.
  public func sendStartupProfile(_ profile: StartupProfile, of path: StorePath, to source: Substituter) async throws(CacheError) {
    let url = "\(source.url)/\(NixfsWire.Route.profile(hashPart: path.hashPart))"
    let body = (try? JSONEncoder().encode(profile)).map { [UInt8]($0) } ?? []
    guard !body.isEmpty else { return }
    let head = try await transport.get(url, post: body, onStart: { _ in }, onData: { _ in })
    guard head.isSuccess else { throw .httpStatus(url: url, status: head.status, attempts: 1) }
  }
}

extension BinaryCacheClient {
  /// Asks the first substituter that builds (a nixfs serve with `--build`) for `request`; nil when
  /// none does. The credential is the netrc's for that host, as for any request.
  public func requestBuild(_ request: NixfsWire.BuildRequest) async throws(CacheError) -> NixfsWire.BuildAnswer? {
    guard let builder = await substituters().first(where: \.builds) else { return nil }
    let url = "\(builder.url)/\(NixfsWire.buildsRoute)"
    let body = (try? JSONEncoder().encode(request)).map { [UInt8]($0) } ?? []
    let buffer = Locked<[UInt8]>([])
    let head = try await transport.get(
      url, post: body, onStart: { _ in buffer.withLock { $0.removeAll() } },
      onData: { bytes in
        try buffer.withLock {
          guard $0.count + bytes.count <= 1 << 20 else {
            throw CacheError.sizeMismatch(url: url, field: "size limit", expected: 1 << 20, actual: UInt64($0.count + bytes.count))
          }
          $0.append(contentsOf: bytes)
        }
      })
    // A failed build's answer comes as a 422's body (its first 4 KiB, all an answer takes).
    let bytes = head.isSuccess ? buffer.withLock { $0 } : head.errorBody
    guard [200, 202, 422].contains(head.status), let answer = try? JSONDecoder().decode(NixfsWire.BuildAnswer.self, from: Data(bytes))
    else { throw .httpStatus(url: url, status: head.status, attempts: 1) }
    return answer
  }
}
