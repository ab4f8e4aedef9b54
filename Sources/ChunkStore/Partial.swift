internal import CZstd
import Foundation
import NixFormats
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Verified chunks on their way to a pack: readable at once, written in batches off the read path.
final class ArrivingChunks: Sendable {
  struct Chunk: Sendable {
    let raw: [UInt8]
    /// What goes into the pack: the zstd frame as it came, or the raw bytes.
    let stored: [UInt8]
    let codec: Codec
  }
  private let state = Mutex<(chunks: [ChunkID: Chunk], scheduled: Bool)>(([:], false))

  func bytes(_ id: ChunkID) -> [UInt8]? { state.withLock { $0.chunks[id]?.raw } }

  /// Adds a chunk; true when no write is scheduled yet (the caller schedules one).
  func add(_ id: ChunkID, _ chunk: Chunk) -> Bool {
    state.withLock { s in
      s.chunks[id] = chunk
      defer { s.scheduled = true }
      return !s.scheduled
    }
  }

  /// What to write now; an empty answer ends the scheduled write.
  func batch(limit: Int) -> [(ChunkID, Chunk)] {
    state.withLock { s in
      var out: [(ChunkID, Chunk)] = []
      var bytes = 0
      for (id, c) in s.chunks where bytes < limit {
        out.append((id, c))
        bytes += c.stored.count
      }
      if out.isEmpty { s.scheduled = false }
      return out
    }
  }

  func written(_ ids: [ChunkID]) { state.withLock { s in for id in ids { s.chunks[id] = nil } } }
}

extension ChunkStore {
  /// Registers a path from a chunk index the caller verified (signature, agreement with the
  /// narinfo): its tree becomes servable at once, and its chunks arrive as they are read
  /// (`accept`). The index must also agree with itself and with what the store already holds
  /// (content names, sizes); else nothing is registered. A path already here stays as it is.
  public func registerPartial(_ manifest: Manifest) throws(ChunkStoreError) {
    guard writer != nil else { throw .index(path: indexPath, operation: "register", message: "store opened read-only") }
    let info = manifest.info
    try checkIndex(manifest)
    let multiplicity = manifest.multiplicity
    let files = multiplicity.values.reduce(0) { $0 + $1.count }
    try wrap("register \(info.storePath)") {
      try withWriter { db in
        guard try Self.schemaFacts(db, indexPath).version >= Self.listNamedVersion else {
          throw ChunkStoreError.indexRefused(
            storePath: info.storePath, reason: "this store's index predates list-named contents; run nixfs fsck")
        }
        try db.transaction {
          let existing = try db.prepare("SELECT state FROM paths WHERE store_path = ?").bind(info.storePath)
          if try existing.step() {
            if existing.int(0) != PathState.incomplete.rawValue { return }
            try db.prepare("DELETE FROM paths WHERE store_path = ?").bind(info.storePath).run()
          }
          var newContents: [(ContentID, Int64)] = []
          let insertContent = try db.prepare("INSERT OR IGNORE INTO contents(digest, size, refs, skip) VALUES(?, ?, ?, ?)")
          let known = try db.prepare("UPDATE contents SET refs = refs + ? WHERE digest = ? RETURNING size")
          for (content, m) in multiplicity.sorted(by: { $0.key < $1.key }) {
            insertContent.again()
            insertContent.set(1, content)
            insertContent.set(2, m.size)
            insertContent.set(3, m.count)
            insertContent.set(4, Int(manifest.slices[content] ?? 0))
            try insertContent.run()
            if db.changes == 1 {
              newContents.append((content, db.lastInsertRowID))
              continue
            }
            known.again()
            known.set(1, m.count)
            known.set(2, content)
            guard try known.step(), UInt64(known.int(0)) == m.size else {
              throw ChunkStoreError.indexRefused(
                storePath: info.storePath, reason: "content \(content) has another size in this store")
            }
            _ = try known.step()
          }
          var gained: [ChunkID: (refs: Int, size: UInt32)] = [:]
          for (content, _) in newContents {
            for ref in manifest.chunks[content] ?? [] { gained[ref.id, default: (0, ref.size)].refs += 1 }
          }
          let insertChunk = try db.prepare(
            "INSERT OR IGNORE INTO chunks(digest, size, stored, codec, pack, offset, data, refs) VALUES(?, ?, 0, 2, NULL, 0, NULL, 0)"
          )
          let addRefs = try db.prepare("UPDATE chunks SET refs = refs + ? WHERE digest = ? RETURNING id, size")
          var rowOf: [ChunkID: Int64] = [:]
          for (id, g) in gained.sorted(by: { $0.key < $1.key }) {
            insertChunk.again()
            insertChunk.set(1, id)
            insertChunk.set(2, Int(g.size))
            try insertChunk.run()
            addRefs.again()
            addRefs.set(1, g.refs)
            addRefs.set(2, id)
            guard try addRefs.step(), addRefs.int(1) == Int64(g.size) else {
              throw ChunkStoreError.indexRefused(storePath: info.storePath, reason: "chunk \(id) has another size in this store")
            }
            rowOf[id] = addRefs.int(0)
            _ = try addRefs.step()
          }
          try Self.insertChunkLists(db, newContents, of: manifest, rows: rowOf)
          try Self.insertPath(db, manifest, state: .partial, files: files)
          // Packed small files are named by their bytes: checked when their chunk is here.
          let slice = try db.prepare("INSERT OR IGNORE INTO unverified_slices(chunk, content, skip, size) VALUES(?, ?, ?, ?)")
          for (content, _) in newContents {
            guard let skip = manifest.slices[content], let chunk = manifest.chunks[content]?.first else { continue }
            slice.again()
            slice.set(1, chunk.id)
            slice.set(2, content)
            slice.set(3, Int(skip))
            slice.set(4, multiplicity[content]!.size)
            try slice.run()
          }
        }
      }
    }
    try checkHeldSlices(of: info.storePath)
  }

  /// Packed files of a newly registered path whose chunk the store already holds: checked now.
  /// A mismatch means the index lied about them: the path goes again.
  func checkHeldSlices(of path: String) throws(ChunkStoreError) {
    let rows: [(ChunkLocation, ContentID, Int, Int)] = try wrap("slices") {
      try withReader { db in
        let s = try db.prepare(
          "SELECT s.content, s.skip, s.size, ch.id, ch.digest, ch.size, ch.stored, ch.codec, ch.pack, ch.offset "
            + "FROM unverified_slices s JOIN chunks ch ON ch.digest = s.chunk WHERE ch.codec != 2")
        var out: [(ChunkLocation, ContentID, Int, Int)] = []
        while try s.step() {
          guard let content = s.digest(0), let id = s.digest(4) else { continue }
          let loc = ChunkLocation(
            rowID: s.int(3), id: id, size: Int(s.int(5)), stored: Int(s.int(6)), codec: Codec(rawValue: s.int(7)) ?? .raw,
            pack: s.isNull(8) ? nil : s.int(8), offset: UInt64(s.int(9)))
          out.append((loc, content, Int(s.int(1)), Int(s.int(2))))
        }
        return out
      }
    }
    guard !rows.isEmpty else { return }
    var bad: ContentID?
    try gcLock.read { () throws(ChunkStoreError) in
      for (loc, content, skip, size) in rows where bad == nil {
        let raw = try chunkBytes(loc)
        let ok =
          skip + size <= raw.count
          && raw.withUnsafeBytes { SHA256Digest.of(UnsafeRawBufferPointer(rebasing: $0[skip..<skip + size])) } == content
        if !ok { bad = content }
      }
    }
    if let bad {
      if let row = try partialRow(path) { _ = try evict(row: row, path: path, keepAsIncomplete: false) }
      throw .indexRefused(storePath: path, reason: "the packed file \(bad) does not match its name")
    }
    try wrap("slices") {
      try withWriter { db in
        let del = try db.prepare("DELETE FROM unverified_slices WHERE chunk = ? AND content = ?")
        for (loc, content, _, _) in rows {
          del.again()
          del.set(1, loc.id)
          del.set(2, content)
          try del.run()
        }
      }
    }
  }

  /// The chunk lists of contents new to the index (ingest and partial registration alike).
  static func insertChunkLists(_ db: Database, _ contents: [(ContentID, Int64)], of manifest: Manifest, rows: [ChunkID: Int64]) throws {
    let insertList = try db.prepare("INSERT INTO content_chunks(content, offset, chunk) VALUES(?, ?, ?)")
    for (content, contentRow) in contents {
      var offset: UInt64 = 0
      for ref in manifest.chunks[content] ?? [] {
        insertList.again()
        insertList.set(1, contentRow)
        insertList.set(2, offset)
        insertList.set(3, rows[ref.id]!)
        try insertList.run()
        offset += UInt64(ref.size)
      }
    }
  }

  /// The path's row: its narinfo facts and tree.
  static func insertPath(_ db: Database, _ manifest: Manifest, state: PathState, files: Int) throws {
    let info = manifest.info
    let t = now()
    try db.prepare(
      """
      INSERT INTO paths(store_path, state, nar_hash, nar_size, refs, deriver, sigs, ca, tree, files, file_bytes,
        registered, last_access) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
      """
    ).bind(
      info.storePath, state.rawValue, info.narHash, info.narSize, info.references.joined(separator: " "), info.deriver,
      info.signatures.joined(separator: "\n"), info.ca, manifest.encodeTree(), files, manifest.fileBytes, t, t
    ).run()
  }

  /// What an index must say of itself before it may name contents here: every file's chunks
  /// cover it, and its content name is the one the chunks imply (one chunk: its digest; several:
  /// the list's name). A packed small file is named by its bytes, checked when its chunk comes.
  func checkIndex(_ m: Manifest) throws(ChunkStoreError) {
    func refuse(_ why: String) -> ChunkStoreError { .indexRefused(storePath: m.info.storePath, reason: why) }
    let limit = UInt32(largestChunk)
    for (content, size) in m.contents {
      guard let refs = m.chunks[content], !refs.isEmpty || size == 0 else { throw refuse("content \(content) has no chunk list") }
      let total = refs.reduce(UInt64(0)) { $0 + UInt64($1.size) }
      if refs.contains(where: { $0.size > limit }) { throw refuse("content \(content) has a chunk over \(limit) bytes") }
      if let skip = m.slices[content] {
        guard refs.count == 1, UInt64(skip) + size <= total else { throw refuse("content \(content): bad slice") }
      } else if size == 0 {
        guard content == emptyContent else { throw refuse("an empty file is not named as empty") }
      } else {
        guard total == size else { throw refuse("content \(content): chunks hold \(total) bytes, the file \(size)") }
        let name = refs.count == 1 ? refs[0].id : ContentID.ofChunkList(refs)
        guard name == content else { throw refuse("content \(content) is not named by its chunks") }
      }
    }
  }

  /// Checks fetched bytes against the chunk they were asked for (digest, size) and, if they are
  /// it, makes them readable at once and schedules their write to a pack. Packed small files in
  /// the chunk are checked against their names too. Returns the uncompressed bytes.
  @discardableResult
  public func accept(_ id: ChunkID, size: Int, zstd: Bool, bytes: [UInt8], source: String) throws(ChunkStoreError) -> [UInt8] {
    func refuse(_ why: String) -> ChunkStoreError { .chunkRejected(chunk: id, source: source, reason: why) }
    let raw: [UInt8]
    if zstd {
      guard let r = decompress(bytes, rawSize: size) else { throw refuse("not one zstd frame of \(size) bytes") }
      raw = r
    } else {
      raw = bytes
    }
    guard raw.count == size else { throw refuse("\(raw.count) bytes, expected \(size)") }
    guard SHA256Digest.of(raw) == id else { throw refuse("its bytes do not hash to its name") }
    for slice in try slices(in: id) {
      let fits = slice.skip + slice.size <= raw.count
      let got = fits ? raw.withUnsafeBytes { SHA256Digest.of(UnsafeRawBufferPointer(rebasing: $0[slice.skip..<slice.skip + slice.size])) } : nil
      guard got == slice.content else { throw refuse("the packed file \(slice.content) in it does not match its name") }
    }
    // Small or incompressible chunks are stored as they are.
    let stored = zstd && bytes.count < raw.count - raw.count / 32 ? Chunk(raw: raw, stored: bytes, codec: .zstd) : Chunk(raw: raw, stored: raw, codec: .raw)
    chunkCache.put(id, raw)
    if arriving.add(id, stored) {
      DispatchQueue.global(qos: .utility).async { [self] in writeArriving() }
    }
    return raw
  }

  private typealias Chunk = ArrivingChunks.Chunk

  /// Packed small files held in chunk `id`, by what the index says of them.
  func slices(in id: ChunkID) throws(ChunkStoreError) -> [(content: ContentID, skip: Int, size: Int)] {
    try wrap("slices") {
      try withReader { db in
        let s = try db.prepare("SELECT content, skip, size FROM unverified_slices WHERE chunk = ?").bind(id)
        var out: [(ContentID, Int, Int)] = []
        while try s.step() { if let d = s.digest(0) { out.append((d, Int(s.int(1)), Int(s.int(2)))) } }
        return out
      }
    }
  }

  /// Writes arriving chunks to a pack, a batch at a time, until none are left. Only rows still
  /// absent take them (GC may have dropped the path since); other bytes are punched out again.
  func writeArriving() {
    while true {
      let batch = arriving.batch(limit: 8 << 20)
      if batch.isEmpty { return }
      do {
        try writeBatch(batch)
      } catch {
        // They stay readable in memory and absent in the index: a later read fetches them again.
        logger.error("cannot store fetched chunks: \(error)")
      }
      arriving.written(batch.map(\.0))
      if let budget = configuration.maxStoredBytes {
        do { _ = try collectGarbage(maxStoredBytes: budget) } catch { logger.error("online GC failed: \(error)") }
      }
    }
  }

  private func writeBatch(_ batch: [(ChunkID, Chunk)]) throws(ChunkStoreError) {
    try gcLock.read { () throws(ChunkStoreError) in
      let lease = try leasePack()
      var end = lease.start
      var placed: [(id: ChunkID, chunk: Chunk, offset: UInt64?)] = []
      for (id, c) in batch {
        if c.stored.count <= configuration.inlineLimit {
          placed.append((id, c, nil))
          continue
        }
        if let e = c.stored.withUnsafeBytes({ pwriteFully(lease.fd, $0, offset: end) }) {
          returnPack(lease, end: end)
          throw .io(path: packPath(lease.id), operation: "write \(c.stored.count) bytes at \(end)", errno: e)
        }
        placed.append((id, c, end))
        end += UInt64(c.stored.count)
      }
      if end > lease.start && fdatasync(lease.fd) != 0 {
        let e = errno
        _ = ftruncate(lease.fd, off_t(lease.start))
        returnPack(lease, end: lease.start)
        throw .io(path: packPath(lease.id), operation: "fdatasync", errno: e)
      }
      var unused: [(UInt64, UInt64)] = []
      var added: UInt64 = 0
      do {
        try withWriter { db in
          try db.transaction {
            let fill = try db.prepare(
              "UPDATE chunks SET stored = ?, codec = ?, pack = ?, offset = ?, data = ? WHERE digest = ? AND codec = 2")
            for p in placed {
              fill.again()
              fill.set(1, p.chunk.stored.count)
              fill.set(2, p.chunk.codec.rawValue)
              if let offset = p.offset {
                fill.set(3, lease.id)
                fill.set(4, offset)
                fill.setNull(5)
              } else {
                fill.setNull(3)
                fill.set(4, 0)
                fill.set(5, blob: p.chunk.stored)
              }
              fill.set(6, p.id)
              try fill.run()
              if db.changes == 1 {
                added += UInt64(p.chunk.stored.count)
              } else if let offset = p.offset {
                unused.append((offset, UInt64(p.chunk.stored.count)))
              }
            }
            if end > lease.start {
              try db.prepare("UPDATE packs SET committed = max(committed, ?) WHERE id = ?").bind(end, lease.id).run()
            }
            // Checked in `accept` before they were readable.
            let verified = try db.prepare("DELETE FROM unverified_slices WHERE chunk = ?")
            for p in placed {
              verified.again()
              verified.set(1, p.id)
              try verified.run()
            }
          }
        }
      } catch {
        _ = ftruncate(lease.fd, off_t(lease.start))
        returnPack(lease, end: lease.start)
        throw error as? ChunkStoreError ?? .index(path: indexPath, operation: "store fetched chunks", message: "\(error)")
      }
      adjustStored(adding: added)
      for (offset, len) in unused { punchHole(lease.fd, offset: offset, length: len) }
      returnPack(lease, end: end)
    }
  }

  /// Where an absent chunk of a cached layout is now, if it has been stored since.
  func presentLocation(_ loc: ChunkLocation) throws(ChunkStoreError) -> ChunkLocation? {
    try wrap("chunk") {
      try withReader { db -> ChunkLocation? in
        let s = try db.prepare("SELECT size, stored, codec, pack, offset FROM chunks WHERE id = ? AND codec != 2").bind(loc.rowID)
        guard try s.step() else { return nil }
        return ChunkLocation(
          rowID: loc.rowID, id: loc.id, size: Int(s.int(0)), stored: Int(s.int(1)), codec: Codec(rawValue: s.int(2)) ?? .raw,
          pack: s.isNull(3) ? nil : s.int(3), offset: UInt64(s.int(4)))
      }
    }
  }

  /// The chunks of `content` that are not here, among those holding bytes
  /// [offset, offset + count + ahead): what a read there must fetch (with read-ahead).
  public func absentChunks(content: ContentID, offset: UInt64, count: Int, ahead: Int = 0) throws(ChunkStoreError) -> [ChunkRef] {
    try gcLock.read { () throws(ChunkStoreError) -> [ChunkRef] in
      let layout = try self.layout(content)
      let from = offset + layout.skip
      let to = min(layout.skip + layout.size, from + UInt64(count) + UInt64(ahead))
      var out: [ChunkRef] = []
      for (loc, start) in zip(layout.chunks, layout.starts) where loc.codec == .absent {
        guard start < to, start + UInt64(loc.size) > from else { continue }
        if chunkCache.get(loc.id) != nil || arriving.bytes(loc.id) != nil { continue }
        if try presentLocation(loc) != nil { continue }
        out.append(ChunkRef(id: loc.id, size: UInt32(loc.size)))
      }
      return out
    }
  }

  /// Those of `refs` that a path here knows but lacks (anything else is never fetched for it).
  public func absentAmong(_ refs: [ChunkRef]) -> [ChunkRef] {
    (try? withReader { db in
      let s = try db.prepare("SELECT 1 FROM chunks WHERE digest = ? AND codec = 2 AND size = ?")
      return try refs.filter { ref in
        s.again()
        s.set(1, ref.id)
        s.set(2, Int(ref.size))
        guard try s.step() else { return false }
        return chunkCache.get(ref.id) == nil && arriving.bytes(ref.id) == nil
      }
    }) ?? []
  }

  /// Every chunk a partial path still lacks (for `nixfs fetch`, which completes it).
  public func absentChunks(of path: StorePath) throws(ChunkStoreError) -> [ChunkRef] {
    guard let tree = try servableTree(of: path) else { throw .notComplete(storePath: path.path) }
    var seen: Set<ChunkID> = []
    var out: [ChunkRef] = []
    for (content, size) in tree.contents where size > 0 {
      for ref in try absentChunks(content: content, offset: 0, count: Int(size)) where seen.insert(ref.id).inserted {
        out.append(ref)
      }
    }
    return out
  }

  /// Makes a partial path whose chunks are all here complete, once its NAR, rebuilt from them,
  /// hashes to its NarHash (the index's signer said so; this is where it is shown). Waits for
  /// arriving chunks to be written first. A mismatch removes the path: its index lied.
  public func completePartial(_ path: StorePath) throws(ChunkStoreError) {
    guard let tree = try servableTree(of: path) else { throw .notComplete(storePath: path.path) }
    if try partialRow(path.path) == nil { return }
    writeArriving()
    var hasher = NixHasher()
    var writer = NARWriter()
    do {
      try tree.replay(
        { event in
          try writer.write(event)
          if writer.output.count >= 1 << 20 { writer.take().withUnsafeBytes { hasher.update($0) } }
        },
        content: { content, _, emit in try forEachPiece(of: content, emit) })
    } catch let e as ChunkStoreError {
      throw e
    } catch {
      throw .index(path: indexPath, operation: "rebuild \(path)", message: "\(error)")
    }
    writer.take().withUnsafeBytes { hasher.update($0) }
    let got = hasher.finalize().nix32
    guard got == tree.info.narHash, hasher.byteCount == tree.info.narSize else {
      if let row = try partialRow(path.path) { _ = try evict(row: row, path: path.path, keepAsIncomplete: true) }
      throw .narHashMismatch(storePath: path.path, expected: tree.info.narHash, actual: got)
    }
    try wrap("complete \(path)") {
      try withWriter { db in try db.prepare("UPDATE paths SET state = 1 WHERE store_path = ? AND state = 3").bind(path.path).run() }
    }
  }
}
