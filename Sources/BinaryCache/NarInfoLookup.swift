import Foundation
import Logging
import NixFormats

// Looking store paths up: narinfos (signature-checked, cached), closures.
extension BinaryCacheClient {
  /// The narinfo of `path` from the first substituter (in priority order) that has a valid one.
  /// A miss or a failure falls through to the next substituter. Concurrent lookups of one path
  /// (many FUSE requests for the same new path) share a single lookup.
  public func narInfo(for path: StorePath) async throws(CacheError) -> CachedPathInfo {
    try await inflight.run(path) { () async throws(CacheError) in try await self.lookup(path) }
  }

  private func lookup(_ path: StorePath) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    for entry in await resolveAll() {
      let substituter: Substituter
      switch entry {
      case .success(let s): substituter = s
      case .failure(let e):
        failures.append(e)
        continue
      }
      asked.append(substituter.url)
      do {
        if let found = try await narInfo(for: path, from: substituter) { return found }
      } catch {
        logger.debug("narinfo lookup failed", metadata: ["path": "\(path)", "error": "\(error)"])
        failures.append(error)
      }
    }
    if failures.isEmpty {
      throw .notFound(storePath: path.path, substituters: asked)
    }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: path.path, failures: failures)
  }

  /// One substituter's answer: nil when it does not have the path.
  public func narInfo(for path: StorePath, from substituter: Substituter) async throws(CacheError) -> CachedPathInfo? {
    try await narInfo(hashPart: path.hashPart, expecting: path, from: substituter)
  }

  /// The narinfo of whichever path has this hash part (what a binary cache is asked for), from
  /// the first substituter that has a valid one; `notFound` when none has it.
  public func narInfo(hashPart: String) async throws(CacheError) -> CachedPathInfo {
    var failures: [CacheError] = []
    var asked: [String] = []
    for entry in await resolveAll() {
      guard case .success(let substituter) = entry else { continue }
      asked.append(substituter.url)
      do {
        if let found = try await narInfo(hashPart: hashPart, expecting: nil, from: substituter) { return found }
      } catch {
        failures.append(error)
      }
    }
    let name = "\(configuration.storeDir)/\(hashPart)"
    if failures.isEmpty { throw .notFound(storePath: name, substituters: asked) }
    if failures.count == 1 { throw failures[0] }
    throw .allSubstitutersFailed(storePath: name, failures: failures)
  }

  private func narInfo(
    hashPart: String, expecting path: StorePath?, from substituter: Substituter
  ) async throws(CacheError) -> CachedPathInfo? {
    let url = "\(substituter.url)/\(hashPart).narinfo"
    switch narinfoCache.lookup(substituter: substituter.url, hashPart: hashPart) {
    case .absent:
      return nil
    case .present(let text):
      // Re-checked on every use: the trusted keys may have changed since it was stored.
      if let info = try? check(text, url: url, hashPart: hashPart, path: path, substituter: substituter) { return info }
    case nil: break
    }
    guard let text = try await fetchText(url) else {
      narinfoCache.store(substituter: substituter.url, hashPart: hashPart, .absent)
      return nil
    }
    let info = try check(text, url: url, hashPart: hashPart, path: path, substituter: substituter)
    narinfoCache.store(substituter: substituter.url, hashPart: hashPart, .present(text))
    return info
  }

  private func check(
    _ text: String, url: String, hashPart: String, path: StorePath?, substituter: Substituter
  ) throws(CacheError) -> CachedPathInfo {
    let info: NarInfo
    do { info = try NarInfo(parsing: text, source: url, storeDir: configuration.storeDir) } catch {
      throw .malformedNarInfo(error)
    }
    guard path.map({ info.storePath == $0 }) ?? (info.storePath.hashPart == hashPart) else {
      throw .wrongStorePath(url: url, expected: path?.path ?? "\(configuration.storeDir)/\(hashPart)-…", actual: info.storePath.path)
    }
    if configuration.requireSignatures {
      do {
        let signer = try info.verify(trusting: trusted)
        return CachedPathInfo(info: info, substituter: substituter, signer: signer)
      } catch { throw .untrusted(url: url, error: error) }
    }
    return CachedPathInfo(info: info, substituter: substituter, signer: trusted.validSigner(of: info.fingerprint, signatures: info.signatures))
  }

  /// The narinfos of `roots` and everything they reference, transitively. Lookups run in parallel
  /// (up to `maxConnections` at once) over the transport's kept-alive connections.
  /// A substituter that offers chunk indexes answers a whole closure in one request
  /// (`nixfs/v1/closure`); each narinfo in it is checked as if fetched alone, and whatever it
  /// lacks is looked up as usual.
  public func closure(of roots: [StorePath]) async throws(CacheError) -> [StorePath: CachedPathInfo] {
    var result: [StorePath: CachedPathInfo] = [:]
    if let source = await chunkSources().first {
      for root in roots { result.merge(await closureInOneRequest(root, from: source)) { a, _ in a } }
    }
    var seen = Set(roots).union(result.keys)
    var pending = Array(Set(roots).subtracting(result.keys)).sorted()
    for info in result.values {
      for ref in info.info.references where seen.insert(ref).inserted { pending.append(ref) }
    }
    let width = configuration.maxConnections
    let outcome: CacheError? = await withTaskGroup(of: Result<CachedPathInfo, CacheError>.self) { group in
      var inFlight = 0
      while true {
        while inFlight < width, let next = pending.popLast() {
          inFlight += 1
          group.addTask {
            do throws(CacheError) { return .success(try await self.narInfo(for: next)) } catch { return .failure(error) }
          }
        }
        guard let done = await group.next() else { return nil }
        inFlight -= 1
        switch done {
        case .failure(let error):
          group.cancelAll()
          return error
        case .success(let found):
          result[found.info.storePath] = found
          for ref in found.info.references where seen.insert(ref).inserted { pending.append(ref) }
        }
      }
    }
    if let outcome { throw outcome }
    return result
  }

  /// The closure of `root` as `source`'s closure endpoint gives it, each narinfo checked (and
  /// remembered like any other); empty when the request or its answer is unusable.
  func closureInOneRequest(_ root: StorePath, from source: Substituter) async -> [StorePath: CachedPathInfo] {
    let url = "\(source.url)/\(NixfsWire.Route.closure(hashPart: root.hashPart))"
    let answer: NixfsWire.ClosureAnswer
    do {
      guard let got = try await fetchBytes(url, limit: 64 << 20) else { return [:] }
      answer = try JSONDecoder().decode(NixfsWire.ClosureAnswer.self, from: Data(got.bytes))
    } catch {
      logger.warning("closure endpoint not usable; asking path by path", metadata: ["url": "\(url)", "error": "\(error)"])
      return [:]
    }
    var out: [StorePath: CachedPathInfo] = [:]
    for (hashPart, text) in answer.narinfos {
      let narinfoURL = "\(source.url)/\(hashPart).narinfo"
      do throws(CacheError) {
        let info = try check(text, url: narinfoURL, hashPart: hashPart, path: nil, substituter: source)
        narinfoCache.store(substituter: source.url, hashPart: hashPart, .present(text))
        out[info.info.storePath] = info
      } catch {
        logger.warning("a narinfo of a closure answer was refused", metadata: ["url": "\(narinfoURL)", "error": "\(error)"])
      }
    }
    return out
  }
}
