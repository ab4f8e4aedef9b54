import ChunkStore
import Foundation
import NixFormats
import TestSupport

/// A NAR made by real Nix (`nix-store --dump`) and the store path `nix-store --add` would give it.
struct NARFixture {
  let nar: [UInt8]
  let hash: NixHash
  let storePath: StorePath
  var info: PathInfo { PathInfo(storePath: storePath, narHash: hash, narSize: UInt64(nar.count)) }

  init(tree: String, name: String) throws {
    nar = try NixFixture.dump(tree)
    hash = NixHash.sha256(nar)
    storePath = try StorePath.addedSource(narHash: hash, name: name)
  }

  /// The same NAR under another store path (as if another derivation produced the same tree).
  func renamed(_ name: String) throws -> NARFixture {
    var copy = self
    copy.storePathOverride = try StorePath.addedSource(narHash: hash, name: name)
    return copy
  }
  private var storePathOverride: StorePath? {
    get { nil }
    set { if let newValue { self = NARFixture(nar: nar, hash: hash, storePath: newValue) } }
  }
  private init(nar: [UInt8], hash: NixHash, storePath: StorePath) {
    self.nar = nar
    self.hash = hash
    self.storePath = storePath
  }
}

func openStore(_ dir: String, cacheBytes: Int = 8 << 20, maxStored: UInt64? = nil, inlineLimit: Int = 2048) throws
  -> ChunkStore
{
  try ChunkStore(.init(stateDirectory: dir, inlineLimit: inlineLimit, cacheBytes: cacheBytes, maxStoredBytes: maxStored))
}

/// Ingests in pieces of varying sizes (the cache client feeds whatever arrives).
@discardableResult
func ingest(_ store: ChunkStore, _ f: NARFixture, pieces: Int = 7919) throws -> Manifest {
  let ing = try store.ingest(f.info)
  var i = 0
  var size = 1
  try f.nar.withUnsafeBytes { all in
    while i < all.count {
      let n = min(size, all.count - i)
      try ing.feed(UnsafeRawBufferPointer(rebasing: all[i..<i + n]))
      i += n
      size = size % pieces + 613
    }
  }
  return try ing.commit()
}

func dump(_ store: ChunkStore, _ path: StorePath) throws -> [UInt8] {
  var out: [UInt8] = []
  try store.dump(path) { out += $0 }
  return out
}

/// The nixfs binary built next to the test bundle (works for `.build` and custom scratch paths).
func nixfsBinary() -> String? {
  if let env = ProcessInfo.processInfo.environment["NIXFS_BIN"] { return env }
  var candidates: [String] = []
  for exe in [Bundle.main.executablePath, CommandLine.arguments.first].compactMap({ $0 }) {
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    for _ in 0..<4 {
      candidates.append(dir.appendingPathComponent("nixfs").path)
      dir = dir.deletingLastPathComponent()
    }
  }
  let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
  for scratch in [".build-store", ".build"] { candidates.append(root.appendingPathComponent("\(scratch)/debug/nixfs").path) }
  return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// A tree of many small and a few large files, deterministic from `seed`.
func mixedTree(at root: String, seed: UInt64, files: Int = 60, big: Int = 3 << 20) throws {
  for i in 0..<files {
    let size = [0, 17, 300, 2000, 5000, 40_000][i % 6]
    try Tree.file("\(root)/d\(i % 5)/f\(i)", Tree.bytes(size, seed: seed &+ UInt64(i)))
  }
  try Tree.file("\(root)/big", Tree.bytes(big, seed: seed &* 31 &+ 1))
}
