import Foundation
import NixFormats
import Threads

/// A sink for a partial path's whole NAR that fills the chunks the path still lacks: each one is
/// cut from the stream where the path's (signed, verified) chunk index places it and accepted
/// only if it hashes to its name, as a fetched chunk would be. The partial path stays servable
/// throughout: nothing of it is evicted, so reads of its other files go on, and reads waiting on
/// a chunk find it as soon as it is cut. Once the download verified, `completePartial` makes the
/// path complete.
///
/// This is the fall-back when a chunk source sends bad chunks: a whole NAR from any substituter
/// whose NarHash is the index's supplies them.
public final class PartialRefill: NARSink {
  /// A chunk the path lacks, where it lies in its content's chunk list laid end to end.
  struct Piece {
    let id: ChunkID
    let start: UInt64
    let size: Int
  }

  /// A regular file of the NAR, in NAR order, with the lacking chunks its bytes are part of.
  struct File {
    let content: ContentID?
    let size: UInt64
    let skip: UInt64
    let pieces: [Piece]
  }

  struct Progress {
    var next = 0
    var current: File?
    var position: UInt64 = 0
    /// Chunks being assembled (a packed chunk holds several small files): bytes, how many of them
    /// are in, and the contents that gave them (a content seen again adds nothing).
    var partial: [ChunkID: (bytes: [UInt8], filled: Int, from: Set<ContentID>)] = [:]
    var done: Set<ChunkID> = []
    var accepted = 0
    var rejected = 0
    /// Set when the stream is not the NAR the index describes: nothing more is cut from it.
    var differs: String?
  }

  struct State {
    var reader: NARReader
    var progress = Progress()
  }

  let store: ChunkStore
  public let storePath: StorePath
  let files: [File]
  let narSize: UInt64
  /// The NarHash the index was signed for: only a NAR with this hash can fill the path.
  public let narHash: NixHash
  let source: String
  private let state: Locked<State>

  init(store: ChunkStore, storePath: StorePath, files: [File], info: PathInfo, source: String) {
    (self.store, self.storePath, self.files, self.source) = (store, storePath, files, source)
    (narSize, narHash) = (info.narSize, info.narHash)
    state = Locked(State(reader: NARReader(totalSize: info.narSize)))
  }

  /// Chunks filled and refused so far.
  public var counts: (accepted: Int, rejected: Int) { state.withLock { ($0.progress.accepted, $0.progress.rejected) } }

  /// Starts over from byte 0; chunks already accepted stay (they were checked).
  public func reset() {
    state.withLock { s in
      s.reader = NARReader(totalSize: narSize)
      let p = s.progress
      s.progress = Progress(done: p.done, accepted: p.accepted, rejected: p.rejected)
    }
  }

  public func write(_ bytes: UnsafeRawBufferPointer) {
    state.withLock { s in
      guard s.progress.differs == nil else { return }
      // Moved out and back, so neither is copied on write.
      var reader = s.reader
      var progress = s.progress
      s.reader = NARReader()
      s.progress = Progress()
      do {
        try reader.feed(bytes) { event in try handle(event, &progress) }
      } catch {
        // Not for this sink to judge: the download's own checks refuse a bad stream.
        if progress.differs == nil { progress.differs = "\(error)" }
      }
      s.reader = reader
      s.progress = progress
    }
  }

  private func handle(_ event: NAREvent, _ s: inout Progress) throws {
    switch event {
    case .file(_, let size, _, _):
      guard s.next < files.count, files[s.next].size == size else {
        s.differs = "file \(s.next) of the NAR is not the index's"
        throw RefillStop()
      }
      s.current = files[s.next]
      s.next += 1
      s.position = 0
    case .data(let piece):
      guard let file = s.current else { return }
      cut(piece, file, &s)
      s.position += UInt64(piece.count)
    case .endFile:
      if let file = s.current, let content = file.content {
        for p in file.pieces { s.partial[p.id]?.from.insert(content) }
      }
      s.current = nil
    case .directory, .endDirectory, .symlink: break
    }
  }

  /// Copies the bytes of `piece` (the current file's, from `s.position`) into the lacking chunks
  /// they overlap, and accepts each chunk that is whole.
  private func cut(_ piece: UnsafeRawBufferPointer, _ file: File, _ s: inout Progress) {
    guard let content = file.content, !file.pieces.isEmpty else { return }
    let from = file.skip + s.position
    let to = from + UInt64(piece.count)
    for p in file.pieces where p.start < to && p.start + UInt64(p.size) > from {
      if s.done.contains(p.id) || s.partial[p.id]?.from.contains(content) == true { continue }
      let lower = max(from, p.start)
      let upper = min(to, p.start + UInt64(p.size))
      var entry = s.partial[p.id] ?? ([UInt8](repeating: 0, count: p.size), 0, [])
      entry.bytes.withUnsafeMutableBytes { dst in
        let d = UnsafeMutableRawBufferPointer(rebasing: dst[Int(lower - p.start)..<Int(upper - p.start)])
        d.copyMemory(from: UnsafeRawBufferPointer(rebasing: piece[Int(lower - from)..<Int(upper - from)]))
      }
      entry.filled += Int(upper - lower)
      guard entry.filled >= p.size else {
        s.partial[p.id] = entry
        continue
      }
      s.partial[p.id] = nil
      s.done.insert(p.id)
      do {
        try store.accept(p.id, size: p.size, zstd: false, bytes: entry.bytes, source: source)
        s.accepted += 1
      } catch {
        s.rejected += 1
      }
    }
  }
}

/// Ends the parse of a stream that is not the index's NAR.
struct RefillStop: Error {}

extension ChunkStore {
  /// A sink that fills what the partial path `path` lacks from its whole NAR (from `source`, for
  /// error messages); nil when the path is not partial.
  public func refill(_ path: StorePath, source: String) throws(ChunkStoreError) -> PartialRefill? {
    guard try partialRow(path.path) != nil, let tree = try servableTree(of: path) else { return nil }
    let lacking = Set(try absentChunks(of: path).map(\.id))
    var files: [PartialRefill.File] = []
    var failure: ChunkStoreError?
    // NAR order is the tree's replay order; a content's callback follows its file's header.
    do {
      try tree.replay(
        { event in
          if case .file(_, let size, _, _) = event { files.append(.init(content: nil, size: size, skip: 0, pieces: [])) }
        },
        content: { content, size, _ in
          do throws(ChunkStoreError) {
            let layout = try self.layout(content)
            let pieces = zip(layout.chunks, layout.starts).compactMap { loc, start -> PartialRefill.Piece? in
              guard lacking.contains(loc.id), start < layout.skip + size, start + UInt64(loc.size) > layout.skip else { return nil }
              return .init(id: loc.id, start: start, size: loc.size)
            }
            files[files.count - 1] = .init(content: content, size: size, skip: layout.skip, pieces: pieces)
          } catch {
            failure = error
          }
        })
    } catch {
      throw .index(path: indexPath, operation: "refill \(path)", message: "\(error)")
    }
    if let failure { throw failure }
    return PartialRefill(store: self, storePath: path, files: files, info: tree.info, source: source)
  }
}
