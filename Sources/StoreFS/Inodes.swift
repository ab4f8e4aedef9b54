/// Inode numbers. Regular files are numbered by content, so identical files anywhere in the mount
/// are one inode (hard links to the kernel, one page-cache copy). Directories and symlinks are
/// numbered by (tree instance, node index): a tree instance is a store path as seen in one
/// namespace (the main store directory, or one CSI view), because Linux allows a directory only
/// one parent. Numbers are deterministic, so they stay stable for the life of the mount.
import ChunkStore

package enum Inode {
  package static let root: UInt64 = 1
  package static let fileTag: UInt64 = 1 << 63
  package static let nodeTag: UInt64 = 1 << 62
  package static let virtualTag: UInt64 = 1 << 61

  package static func file(content: UInt64, executable: Bool) -> UInt64 {
    fileTag | content << 1 | (executable ? 1 : 0)
  }

  /// 62 bits of a content digest: the file's inode number less the tag and executable bit.
  package static func fileNumber(_ content: ContentID) -> UInt64 {
    content.digest.w0 & (1 << 62 - 1)
  }

  package static func node(instance: UInt32, index: Int32) -> UInt64 {
    nodeTag | UInt64(instance) << 32 | UInt64(UInt32(bitPattern: index))
  }

  package static func virtual(_ n: UInt64) -> UInt64 { virtualTag | n }

  package enum Kind: Equatable {
    case root
    case file(content: UInt64, executable: Bool)
    case node(instance: UInt32, index: Int32)
    case virtual(UInt64)
    case invalid
  }

  package static func decode(_ ino: UInt64) -> Kind {
    if ino == root { return .root }
    if ino & fileTag != 0 { return .file(content: (ino & ~fileTag) >> 1, executable: ino & 1 == 1) }
    if ino & nodeTag != 0 {
      return .node(instance: UInt32((ino & ~nodeTag) >> 32), index: Int32(bitPattern: UInt32(ino & 0xffff_ffff)))
    }
    if ino & virtualTag != 0 { return .virtual(ino & ~virtualTag) }
    return .invalid
  }
}
