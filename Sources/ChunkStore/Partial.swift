import Foundation
import NixFormats

extension ChunkStore {
  /// Registers a path from a chunk index the caller verified (signature, agreement with the
  /// narinfo): its tree becomes servable at once, and its chunks arrive as they are read
  /// (`accept`). The index must also agree with itself and with what the store already holds
  /// (content names, sizes); else nothing is registered. A path already here stays as it is.
  public func registerPartial(_ manifest: Manifest) throws(ChunkStoreError) {
    guard isWriter else { throw .index(path: indexPath, operation: "register", message: "store opened read-only") }
    let info = manifest.info
    try checkIndex(manifest)
    let multiplicity = manifest.multiplicity
    let files = multiplicity.values.reduce(0) { $0 + $1.count }
    try wrap("register \(info.storePath)") {
      try withWriter { db in
        guard try Self.schemaFacts(db, indexPath).version >= Self.listNamedVersion else {
          throw ChunkStoreError.indexRefused(
            storePath: info.storePath.path, reason: "this store's index predates list-named contents; run nixfs fsck")
        }
        try db.transaction {
          if let state = try db.pathState(info.storePath.path) {
            if state != PathState.incomplete.rawValue { return }
            try db.deletePath(info.storePath.path)
          }
          var newContents: [(ContentID, Int64)] = []
          let insertContent = try db.insertContentStatement()
          let known = try db.addContentRefsReturningSizeStatement()
          for (content, m) in multiplicity.sorted(by: { $0.key < $1.key }) {
            let skip = Int(manifest.slices[content] ?? 0)
            if let row = try db.insertContent(insertContent, content, size: m.size, count: m.count, skip: skip) {
              newContents.append((content, row))
              continue
            }
            known.again()
            known.set(1, m.count)
            known.set(2, content)
            guard try known.step(), UInt64(known.int(0)) == m.size else {
              throw ChunkStoreError.indexRefused(
                storePath: info.storePath.path, reason: "content \(content) has another size in this store")
            }
            _ = try known.step()
          }
          var gained: [ChunkID: (refs: Int, size: UInt32)] = [:]
          for (content, _) in newContents {
            for ref in manifest.chunks[content] ?? [] { gained[ref.id, default: (0, ref.size)].refs += 1 }
          }
          let insertChunk = try db.insertAbsentChunkStatement()
          let addRefs = try db.addChunkRefsCheckingSizeStatement()
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
              throw ChunkStoreError.indexRefused(storePath: info.storePath.path, reason: "chunk \(id) has another size in this store")
            }
            rowOf[id] = addRefs.int(0)
            _ = try addRefs.step()
          }
          try db.insertChunkLists(newContents, of: manifest, rows: rowOf)
          try db.insertPath(manifest, state: .partial, files: files)
          // Packed small files are named by their bytes: checked when their chunk is here.
          let slice = try db.insertSliceStatement()
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
    try checkHeldSlices(of: info.storePath.path)
  }

  /// Packed files of a newly registered path whose chunk the store already holds: checked now.
  /// A mismatch means the index lied about them: the path goes again.
  func checkHeldSlices(of path: String) throws(ChunkStoreError) {
    let rows: [(ChunkLocation, ContentID, Int, Int)] = try wrap("slices") {
      try withReader { db in try db.heldSlices() }
    }
    guard !rows.isEmpty else { return }
    var bad: ContentID?
    try gcLock.read { () throws(ChunkStoreError) in
      for (loc, content, skip, size) in rows where bad == nil {
        let raw = try chunkBytes(loc)
        let ok =
          skip + size <= raw.count
          && raw.withUnsafeBytes { ContentID.of(UnsafeRawBufferPointer(rebasing: $0[skip..<skip + size])) } == content
        if !ok { bad = content }
      }
    }
    if let bad {
      if let row = try partialRow(path) { _ = try evict(row: row, path: path, keepAsIncomplete: false) }
      throw .indexRefused(storePath: path, reason: "the packed file \(bad) does not match its name")
    }
    try wrap("slices") {
      try withWriter { db in
        let del = try db.deleteSliceStatement()
        for (loc, content, _, _) in rows {
          del.again()
          del.set(1, loc.id)
          del.set(2, content)
          try del.run()
        }
      }
    }
  }

  /// What an index must say of itself before it may name contents here: every file's chunks
  /// cover it, and its content name is the one the chunks imply (one chunk: its digest; several:
  /// the list's name). A packed small file is named by its bytes, checked when its chunk comes.
  func checkIndex(_ m: Manifest) throws(ChunkStoreError) {
    func refuse(_ why: String) -> ChunkStoreError { .indexRefused(storePath: m.info.storePath.path, reason: why) }
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
        let name = refs.count == 1 ? ContentID(chunk: refs[0].id) : ContentID.ofChunkList(refs)
        guard name == content else { throw refuse("content \(content) is not named by its chunks") }
      }
    }
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
    let got = hasher.finalize()
    guard got == tree.info.narHash, hasher.byteCount == tree.info.narSize else {
      if let row = try partialRow(path.path) { _ = try evict(row: row, path: path.path, keepAsIncomplete: true) }
      throw .narHashMismatch(storePath: path.path, expected: tree.info.narHash.nix32, actual: got.nix32)
    }
    try wrap("complete \(path)") {
      try withWriter { db in try db.markPartialComplete(path.path) }
    }
  }
}
