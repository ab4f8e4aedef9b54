import Foundation

#if canImport(Glibc)
  import Glibc
#endif

extension ChunkPipeline {
  /// The commit: durable data first, then one index transaction.
  /// Returns the manifest as stored: a small file the store already held keeps the shared chunk
  /// it was packed in first, not the one this ingest packed it in.
  func publish(manifest: Manifest, fileCount: Int) throws -> Manifest {
    var stored = manifest
    // The workers are done (`finish`): what they wrote is final.
    let (written, existing, packEnd) = shared.withLock { ($0.written, $0.existing, $0.packEnd) }
    let lease = self.lease.withLock { $0 }
    // The pack's fdatasync runs while the index rows go in; the transaction waits for it before
    // COMMIT, so the index still never points at bytes that are not durable.
    let sync = lease.flatMap { packEnd > $0.start ? PendingSync(fd: $0.fd) : nil }
    defer { _ = sync?.wait() }
    var duplicates: [(UInt64, Int)] = []
    var added: UInt64 = 0
    let info = manifest.info
    let multiplicity = manifest.multiplicity
    try store.withWriter { db in
      try db.transaction {
        if let state = try db.pathState(info.storePath.path) {
          // A complete path, or a partial one registered while this ingest ran (it holds references).
          if state != ChunkStore.PathState.incomplete.rawValue {
            throw ChunkStoreError.alreadyComplete(storePath: info.storePath.path)
          }
          try db.deletePath(info.storePath.path)
        }
        // Statements are prepared once and bound by type, and rows go in in digest order (the
        // digest indexes then grow at neighbouring leaves): this matters for paths of many small
        // files, where the commit is most of the ingest.
        //
        // Which contents are new: only their chunk lists are recorded and counted. A live content
        // never has zero references (GC deletes it with its last one), so an existing row is a
        // complete one and only gains our references. (Plain statements: RETURNING would put
        // every execution through a temporary table.)
        var newContents: [(ContentID, Int64)] = []
        var knownSingles: [ContentID] = []
        let insertContent = try db.insertContentStatement()
        let addContentRefs = try db.addContentRefsStatement()
        for (content, m) in multiplicity.sorted(by: { $0.key < $1.key }) {
          let skip = Int(manifest.slices[content] ?? 0)
          if let row = try db.insertContent(insertContent, content, size: m.size, count: m.count, skip: skip) {
            newContents.append((content, row))
          } else {
            addContentRefs.again()
            addContentRefs.set(1, m.count)
            addContentRefs.set(2, content)
            try addContentRefs.run()
            // Neither inserted nor there: the content's row is what is missing, not a chunk.
            guard db.changes == 1 else { throw ChunkStoreError.contentNotFound(content) }
            // A same-named file of several chunks has the same list; one chunk may have been
            // stored (or packed) otherwise.
            if manifest.chunks[content]?.count == 1 { knownSingles.append(content) }
          }
        }
        // References each chunk gains: one per position in a new content's chunk list.
        var gained: [ChunkID: Int] = [:]
        gained.reserveCapacity(written.count)
        for (content, _) in newContents {
          for ref in manifest.chunks[content] ?? [] { gained[ref.id, default: 0] += 1 }
        }
        // Chunks this ingest wrote go in with their final count; INSERT OR IGNORE because a
        // concurrent ingest may have committed the same chunk first.
        var rowOf: [ChunkID: Int64] = [:]
        rowOf.reserveCapacity(gained.count)
        // Chunks a partial path knows but lacks, which this ingest wrote: their rows get the bytes
        // (and keep their references; new ones come below like any deduplicated chunk's).
        var filled: Set<ChunkID> = []
        if try db.hasAbsentChunks() {
          let fill = try db.fillAbsentChunkStatement()
          for (id, w) in written.sorted(by: { $0.key < $1.key }) {
            fill.again()
            // An absent row's offset is 0, not NULL: it stays so for an inline chunk.
            fill.bind(w.stored, pack: lease?.id, at: 1, inlineOffset: 0)
            fill.set(6, id)
            try fill.run()
            guard db.changes == 1 else { continue }
            filled.insert(id)
            added += UInt64(w.stored.bytes)
          }
        }
        let insertChunk = try db.insertChunkStatement()
        for (id, w) in written.sorted(by: { $0.key < $1.key }) where !filled.contains(id) {
          guard let refs = gained[id] else {
            // Nothing new uses it: a small-file group whose files were all in the store already.
            if case .pack(_, let offset, let stored) = w.stored { duplicates.append((offset, stored)) }
            continue
          }
          insertChunk.again()
          insertChunk.set(1, id)
          insertChunk.set(2, w.size)
          insertChunk.set(8, refs)
          insertChunk.bind(w.stored, pack: lease?.id, at: 3, inlineOffset: nil)
          try insertChunk.run()
          if case .pack(_, let offset, let stored) = w.stored, db.changes == 0 {
            duplicates.append((offset, stored))
          }
          if db.changes == 1 {
            rowOf[id] = db.lastInsertRowID
            gained[id] = nil
            added += UInt64(w.stored.bytes)
          }
        }
        // Chunks that were already there (deduplicated) gain references.
        let addRefs = try db.addChunkRefsStatement()
        for (id, n) in gained.sorted(by: { $0.key < $1.key }) {
          addRefs.again()
          addRefs.set(1, n)
          addRefs.set(2, id)
          guard try addRefs.step() else { throw ChunkStoreError.chunkMissing(chunk: id, content: nil) }
          rowOf[id] = addRefs.int(0)
          _ = try addRefs.step()
        }
        try db.insertChunkLists(newContents, of: manifest, rows: rowOf)
        // Their layouts as stored: the rows were there before this transaction, and no other
        // writer can remove them while it runs.
        for content in knownSingles {
          let layout = try store.layout(content)
          stored.chunks[content] = layout.refs
          stored.slices[content] = layout.slice
        }
        try db.insertPath(manifest, state: .complete, files: fileCount)
        if let lease {
          try db.commitPack(lease.id, upTo: packEnd)
          if let e = sync?.wait(), e != 0 {
            throw ChunkStoreError.io(path: store.packPath(lease.id), operation: "fdatasync", errno: e)
          }
        }
      }
    }
    // Committed: the rest is housekeeping a crash may skip (fsck --repair punches dead ranges).
    store.adjustStored(adding: added)
    store.giveBack(existing)
    shared.withLock { $0.existing = [] }
    if let lease {
      for (offset, len) in duplicates { punchHole(lease.fd, offset: offset, length: UInt64(len)) }
      store.returnPack(lease, end: packEnd)
      self.lease.withLock { $0 = nil }
    }
    return stored
  }
}

extension Statement {
  /// Binds where a chunk's bytes are, in columns `c` to `c + 4`: stored size, codec, pack,
  /// offset, and the bytes themselves for an inline chunk (pack NULL, offset `inlineOffset`).
  func bind(_ stored: ChunkPipeline.Stored, pack: Int64?, at c: Int32, inlineOffset: Int64?) {
    switch stored {
    case .inline(let codec, let data):
      set(c, data.count)
      set(c + 1, codec.rawValue)
      setNull(c + 2)
      if let inlineOffset { set(c + 3, inlineOffset) } else { setNull(c + 3) }
      set(c + 4, blob: data)
    case .pack(let codec, let offset, let stored):
      set(c, stored)
      set(c + 1, codec.rawValue)
      // A pack chunk exists only with a lease (it was written to the leased pack).
      set(c + 2, pack!)
      set(c + 3, offset)
      setNull(c + 4)
    }
  }
}
