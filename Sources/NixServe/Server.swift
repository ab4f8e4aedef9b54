import BinaryCache
import ChunkStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NixFormats
import Synchronization
import Threads

/// The HTTP side of `nixfs serve`: a Nix binary cache (`nix-cache-info`, `<hash>.narinfo`,
/// `nar/…`) over Hummingbird. Every answer that comes from the store is immutable.
public struct ServeServer: Sendable {
  public let cache: PullThroughCache
  public let host: String
  public let port: Int
  /// `Priority` in nix-cache-info: lower than cache.nixos.org's 40, so clients ask here first.
  public let priority: Int
  /// Seconds a connection may sit with nothing read or written before it is closed (a client
  /// that connects and says nothing, or stops reading a NAR, holds nothing for long).
  public let idleTimeout: Double
  /// The key chunk indexes are signed with; nil: no chunk index is offered.
  public let indexKey: SecretKey?
  /// Where uploads go, and who may make them; nil: uploads are refused.
  public let uploads: (area: UploadArea, credentials: UploadCredentials)?
  /// Startup profiles nodes report (with the chunk index only).
  public let profiles: StartupProfiles?
  /// `--build`: the serve evaluates and builds what nodes ask for; nil: it does not.
  public let builder: Builder?
  let logger: Logger

  public init(
    cache: PullThroughCache, host: String, port: Int, priority: Int = 30,
    uploads: (area: UploadArea, credentials: UploadCredentials)? = nil, indexKey: SecretKey? = nil,
    idleTimeout: Double = 60, profiles: StartupProfiles? = nil, builder: Builder? = nil, logger: Logger
  ) {
    self.builder = builder
    self.profiles = profiles
    self.cache = cache
    self.idleTimeout = idleTimeout
    self.indexKey = indexKey
    self.uploads = uploads
    self.host = host
    self.port = port
    self.priority = priority
    self.logger = logger
  }

  /// Serves until SIGTERM or SIGINT; `onListening` gets the bound port (for `--listen HOST:0`).
  public func run(onListening: @escaping @Sendable (Int) -> Void) async throws {
    let app = Application(
      router: makeRouter(),
      server: .http1(configuration: .init(idleTimeout: .milliseconds(Int64(idleTimeout * 1000)))),
      configuration: .init(address: .hostname(host, port: port), serverName: "nixfs-serve"),
      onServerRunning: { channel in onListening(channel.localAddress?.port ?? 0) },
      logger: logger)
    try await app.runService()
  }

  /// Every route of the serve (also what the in-process tests drive, without a socket).
  public func makeRouter() -> Router<BasicRequestContext> {
    let router = Router()
    let cache = self.cache
    // Nix ignores keys it does not know; nixfs nodes read this one (Documentation/serve.md).
    let info =
      "StoreDir: \(StorePath.defaultStoreDir)\nWantMassQuery: 1\nPriority: \(priority)\n"
      + (indexKey != nil ? "\(NixfsWire.cacheInfoKey): \(NixfsWire.version)\n" : "")
      + (builder != nil ? "\(NixfsWire.buildInfoKey): \(NixfsWire.version)\n" : "")
    router.get("nix-cache-info") { _, _ in
      Self.text(info, type: "text/x-nix-cache-info", immutable: false)
    }
    // Nix asks HEAD first (is the path valid?), then GET: both pull a missing path through.
    let narinfo: @Sendable (Request, BasicRequestContext) async throws -> Response = { _, context in
      let file = try context.parameters.require("file")
      if file.hasSuffix(".ls") {
        // The NAR's listing, as `nix copy --to 'file://…?write-nar-listing=1'` writes it (without
        // NAR offsets, which are optional: readers then fetch the whole NAR).
        let tree: Manifest
        do throws(ServeError) {
          let path = try await cache.path(hashPart: String(file.dropLast(3)))
          guard let t = try await cache.query({ try $0.tree(of: path) }) else { throw ServeError.store("\(path) vanished from the store") }
          tree = t
        } catch {
          throw Self.httpError(error)
        }
        let data = try JSONSerialization.data(withJSONObject: Self.listing(tree), options: [.sortedKeys])
        return Response(
          status: .ok, headers: [.contentType: "application/json", .cacheControl: "public, max-age=31536000, immutable"],
          body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
      }
      guard file.hasSuffix(".narinfo") else { throw HTTPError(.notFound, message: "no such file\n") }
      do throws(ServeError) {
        let path = try await cache.path(hashPart: String(file.dropLast(8)))
        return Self.text(try await cache.narInfo(of: path), type: "text/x-nix-narinfo", immutable: true)
      } catch {
        throw Self.httpError(error)
      }
    }
    router.get(":file", use: narinfo)
    router.head(":file", use: narinfo)

    if let key = indexKey { Self.addChunkIndex(router, cache: cache, key: key, profiles: profiles) }
    if let builder { Self.addBuilds(router, builder, cache: cache, logger: logger) }
    router.get("metrics") { _, _ -> Response in
      if let bytes = try? await cache.store.async.run({ try $0.storedBytes() }) { cache.counters.storedBytes.set(Double(bytes)) }
      return Response(
        status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: cache.counters.exposition())))
    }
    router.get(RouterPath(NixfsWire.Route.closurePattern)) { _, context -> Response in
      let hash = try context.parameters.require("hash")
      do throws(ServeError) {
        let (root, narinfos) = try await cache.closure(hashPart: hash)
        let answer = NixfsWire.ClosureAnswer(
          root: root.path, narinfos: Dictionary(uniqueKeysWithValues: narinfos.map { ($0.key.hashPart, $0.value) }))
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let data = (try? encoder.encode(answer)) ?? Data()
        // Not immutable: a closure's narinfos are, but whether the serve holds them changes.
        return Response(
          status: .ok, headers: [.contentType: "application/json", .cacheControl: "public, max-age=60"],
          body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
      } catch {
        throw Self.httpError(error)
      }
    }

    // Uploads (`nix copy --to http://…`): the NAR file first, then its narinfo.
    let uploads = self.uploads
    @Sendable func authorise(_ request: Request) throws -> UploadArea {
      guard let uploads else {
        throw HTTPError(.forbidden, message: "uploads are off (start nixfs serve with --upload-credentials-file)\n")
      }
      guard uploads.credentials.allows(request.headers[.authorization]) else {
        throw HTTPError(.unauthorized, headers: [.wwwAuthenticate: "Basic realm=\"nixfs\""], message: "credentials required\n")
      }
      return uploads.area
    }
    router.put("nar/:file") { request, context -> Response in
      let area = try authorise(request)
      let file = try context.parameters.require("file")
      do throws(ServeError) {
        try await area.receiveNAR(name: file, body: request.body.map { Array($0.readableBytesView) })
      } catch {
        throw Self.httpError(error)
      }
      return Response(status: .created)
    }
    router.put(":file") { request, context -> Response in
      let area = try authorise(request)
      let file = try context.parameters.require("file")
      if file == "nix-cache-info" || file.hasSuffix(".ls") { return Response(status: .noContent) }  // ours win
      guard file.hasSuffix(".narinfo") else { throw HTTPError(.badRequest, message: "cannot upload \(LogText.bounded(file))\n") }
      let body = try await request.body.collect(upTo: 1 << 20)
      do throws(ServeError) {
        _ = try await area.receiveNarInfo(hashPart: String(file.dropLast(8)), text: String(buffer: body))
      } catch {
        throw Self.httpError(error)
      }
      return Response(status: .created)
    }
    // Build logs and the like: accepted, not kept.
    router.put("log/:file") { request, _ -> Response in
      _ = try authorise(request)
      return Response(status: .noContent)
    }
    router.get("nar/:file") { _, context -> Response in
      let file = try context.parameters.require("file")
      let path: StorePath
      do throws(ServeError) { path = try await cache.narPath(fileName: file) } catch { throw Self.httpError(error) }
      let size: Int?
      do throws(ServeError) { size = try await cache.info(of: path).map { Int($0.narSize) } } catch { throw Self.httpError(error) }
      let store = cache.store
      let counters = cache.counters
      return Response(
        status: .ok,
        headers: [.contentType: "application/x-nix-nar", .cacheControl: "public, max-age=31536000, immutable"],
        body: ResponseBody(contentLength: size) { writer in
          let dump = NARDump(path: path, store: store, counters: counters)
          defer { dump.cancel() }
          for try await buffer in dump.stream {
            try await writer.write(buffer)
            dump.consumed()
          }
          try await writer.finish(nil)
        })
    }
    return router
  }

  static let encodingHeader = HTTPField.Name(NixfsWire.Header.encoding)!
  static let sizeHeader = HTTPField.Name(NixfsWire.Header.size)!

  /// `GET nixfs/v1/manifests/<NarHash digest, nix32>`: the signed chunk index of a held NAR.
  /// `GET nixfs/v1/chunks/<SHA-256 hex>`: one chunk as stored (`X-Nixfs-Encoding: zstd` or
  /// `identity`; the digest is of the uncompressed bytes). Both immutable.
  static func addChunkIndex(
    _ router: Router<BasicRequestContext>, cache: PullThroughCache, key: SecretKey, profiles: StartupProfiles?
  ) {
    if let profiles { addProfiles(router, profiles) }
    addChunkBatch(router, cache: cache)
    router.get(RouterPath(NixfsWire.Route.manifestPattern)) { request, context -> Response in
      let digest = try context.parameters.require("digest")
      var held: StorePath?
      do throws(ServeError) { held = try await cache.heldPath(narHashDigest: digest) } catch { throw Self.httpError(error) }
      // `?path=<hash part>`: a path not held yet is pulled through first (verified like any),
      // so a node's first request on a cold serve gets an index rather than a NAR.
      if held == nil, let hashPart = request.uri.queryParameters.get("path") {
        do throws(ServeError) {
          let path = try await cache.path(hashPart: hashPart)
          if try await cache.info(of: path)?.narHash.nix32Digest == digest { held = path }
        } catch {
          throw Self.httpError(error)
        }
      }
      guard let path = held, let manifest = try? await cache.query({ try $0.manifest(of: path) }) else {
        throw HTTPError(.notFound, message: "no NAR with that hash here\n")
      }
      let document = try ChunkIndex.document(for: manifest, signedBy: key)
      cache.counters.manifestsServed.increment()
      return Response(
        status: .ok, headers: [.contentType: "application/json", .cacheControl: "public, max-age=31536000, immutable"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: document)))
    }
    router.get(RouterPath(NixfsWire.Route.chunkPattern)) { _, context -> Response in
      let hex = try context.parameters.require("digest")
      guard let id = ChunkID(hex: hex) else { throw HTTPError(.badRequest, message: "not a SHA-256 in hex\n") }
      // The stored bytes go straight from the pack file into the response buffer.
      let found: (StoredChunk, ByteBuffer)?
      do {
        found = try await cache.store.async.run { store in
          try store.withStoredChunk(id) { chunk, fill in
            var buffer = ByteBufferAllocator().buffer(capacity: chunk.storedSize)
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: chunk.storedSize) { raw in
              try fill(UnsafeMutableRawBufferPointer(rebasing: raw[0..<chunk.storedSize]))
              return chunk.storedSize
            }
            return (chunk, buffer)
          }
        }
      } catch {
        throw HTTPError(.internalServerError, message: LogText.bounded("\(error)", limit: 1024) + "\n")
      }
      guard let (chunk, buffer) = found else { throw HTTPError(.notFound, message: "no such chunk here\n") }
      cache.counters.chunksServed.increment()
      cache.counters.chunkBytesServed.increment(by: Int64(chunk.storedSize))
      var headers: HTTPFields = [.contentType: "application/octet-stream", .cacheControl: "public, max-age=31536000, immutable"]
      headers[Self.encodingHeader] = chunk.zstd ? "zstd" : "identity"
      headers[Self.sizeHeader] = String(chunk.size)
      return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: buffer))
    }
  }

  /// `POST nixfs/v1/chunks`: the chunks the body names, streamed back as `ChunkBatch` frames in
  /// the order named (one round trip for the chunks around a node's miss); absent ones as such.
  static func addChunkBatch(_ router: Router<BasicRequestContext>, cache: PullThroughCache) {
    router.post(RouterPath(NixfsWire.chunkBatchRoute)) { request, _ -> Response in
      let body = try await request.body.collect(upTo: NixfsWire.ChunkBatch.maxChunks * 65 + 1024)
      let digests: [[UInt8]]
      do throws(NixfsWire.ChunkBatch.Malformed) {
        digests = try NixfsWire.ChunkBatch.parseRequest(Array(buffer: body))
      } catch {
        throw HTTPError(.badRequest, message: "\(error)\n")
      }
      let store = cache.store
      let counters = cache.counters
      return Response(
        status: .ok, headers: [.contentType: "application/x-nixfs-chunks"],
        body: ResponseBody { writer in
          for digest in digests {
            let id = ChunkID(SHA256Digest(bytes: digest))
            let found = try await store.async.run { store in
              try store.withStoredChunk(id) { chunk, fill -> ByteBuffer in
                let header = NixfsWire.ChunkBatch.header(
                  digest: digest, encoding: chunk.zstd ? .zstd : .identity, stored: chunk.storedSize, size: chunk.size)
                var buffer = ByteBufferAllocator().buffer(capacity: header.count + chunk.storedSize)
                buffer.writeBytes(header)
                try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: chunk.storedSize) { raw in
                  try fill(UnsafeMutableRawBufferPointer(rebasing: raw[0..<chunk.storedSize]))
                  return chunk.storedSize
                }
                return buffer
              }
            }
            if let found {
              counters.chunksServed.increment()
              counters.chunksBatched.increment()
              counters.chunkBytesServed.increment(by: Int64(found.readableBytes - NixfsWire.ChunkBatch.headerSize))
              try await writer.write(found)
            } else {
              try await writer.write(
                ByteBuffer(bytes: NixfsWire.ChunkBatch.header(digest: digest, encoding: .absent, stored: 0, size: 0)))
            }
          }
          counters.chunkBatchesServed.increment()
          try await writer.finish(nil)
        })
    }
  }

  /// `GET` and `POST nixfs/v1/profiles/<hash part>`: a store path's startup profile, and a node's
  /// report of what its pods read first (merged; see `StartupProfiles`).
  static func addProfiles(_ router: Router<BasicRequestContext>, _ profiles: StartupProfiles) {
    @Sendable func hashPart(_ context: BasicRequestContext) throws -> String {
      let hash = try context.parameters.require("hash")
      guard PullThroughCache.isHashPart(hash) else { throw HTTPError(.badRequest, message: "not a store path hash\n") }
      return hash
    }
    router.get(RouterPath(NixfsWire.Route.profilePattern)) { _, context -> Response in
      guard let profile = profiles.get(try hashPart(context)) else { throw HTTPError(.notFound, message: "no profile\n") }
      let data = try JSONEncoder().encode(profile)
      // It grows as nodes report: cacheable only briefly.
      return Response(
        status: .ok, headers: [.contentType: "application/json", .cacheControl: "public, max-age=60"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }
    router.post(RouterPath(NixfsWire.Route.profilePattern)) { request, context -> Response in
      let hash = try hashPart(context)
      let body = try await request.body.collect(upTo: 8 << 20)
      guard let report = try? JSONDecoder().decode(StartupProfile.self, from: Data(buffer: body)), report.version == 1 else {
        throw HTTPError(.badRequest, message: "not a startup profile (version 1)\n")
      }
      let kept: Int
      do { kept = try profiles.merge(report, into: hash) } catch {
        throw HTTPError(.internalServerError, message: "cannot keep the profile: \(error)\n")
      }
      return Self.text("{\"chunks\":\(kept)}\n", type: "application/json", immutable: false)
    }
  }

  /// `POST nixfs/v1/builds`: a `BuildRequest` from a node (HTTP basic or a bearer token from
  /// `--build-credentials-file`), answered with the build's state: 202 building, 200 done, 422
  /// failed, 400 a malformed request, 401 without a credential.
  static func addBuilds(_ router: Router<BasicRequestContext>, _ builder: Builder, cache: PullThroughCache, logger: Logger) {
    router.post(RouterPath(NixfsWire.buildsRoute)) { request, _ -> Response in
      guard builder.settings.credentials.allows(request.headers[.authorization]) else {
        cache.counters.builds["refused"]?.increment()
        logger.warning("a build request without a valid credential was refused")
        throw HTTPError(.unauthorized, headers: [.wwwAuthenticate: "Basic realm=\"nixfs\""], message: "credentials required\n")
      }
      let body = try await request.body.collect(upTo: 64 << 10)
      guard let r = try? JSONDecoder().decode(NixfsWire.BuildRequest.self, from: Data(buffer: body)) else {
        throw HTTPError(.badRequest, message: "not a build request\n")
      }
      let (status, answer) = await builder.request(r)
      let encoder = JSONEncoder()
      encoder.outputFormatting = .sortedKeys
      let data = (try? encoder.encode(answer)) ?? Data()
      return Response(
        status: HTTPResponse.Status(code: status), headers: [.contentType: "application/json", .cacheControl: "no-store"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }
  }

  /// Nix's `.ls` JSON for a tree: `{"version":1,"root":{"type":"directory","entries":{…}}}`.
  static func listing(_ m: Manifest) -> [String: Any] {
    func node(_ i: Int) -> [String: Any] {
      switch m.nodes[i].kind {
      case .directory:
        var entries: [String: Any] = [:]
        for c in m.children(of: i) { entries[String(decoding: m.nodes[c].name, as: UTF8.self)] = node(c) }
        return ["type": "directory", "entries": entries]
      case .regular(_, let size, let executable):
        var o: [String: Any] = ["type": "regular", "size": size]
        if executable { o["executable"] = true }
        return o
      case .symlink(let target):
        return ["type": "symlink", "target": String(decoding: target, as: UTF8.self)]
      }
    }
    return ["version": 1, "root": node(Manifest.root)]
  }

  static func text(_ body: String, type: String, immutable: Bool) -> Response {
    var headers: HTTPFields = [.contentType: type]
    // A held path never changes; nix-cache-info may (priority), so only a short lifetime there.
    headers[.cacheControl] = immutable ? "public, max-age=31536000, immutable" : "public, max-age=300"
    return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
  }

  static func httpError(_ error: ServeError) -> HTTPError {
    switch error {
    case .badRequest(let m): HTTPError(.badRequest, message: LogText.bounded(m, limit: 1024) + "\n")
    case .notFound(let m): HTTPError(.notFound, message: LogText.bounded(m, limit: 1024) + "\n")
    case .upstream(let m): HTTPError(.badGateway, message: LogText.bounded(m, limit: 1024) + "\n")
    case .store(let m): HTTPError(.internalServerError, message: LogText.bounded(m, limit: 1024) + "\n")
    case .forbidden(let m): HTTPError(.forbidden, message: LogText.bounded(m, limit: 1024) + "\n")
    }
  }
}
