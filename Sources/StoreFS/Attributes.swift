import ChunkStore
import Foundation
import Logging
import NixFormats
import Synchronization
#if canImport(Glibc)
  import Glibc
#endif

// Attributes and inode numbers of tree nodes.
extension StoreFileSystem {
  package func attributes(ino: UInt64, of kind: Manifest.Kind) -> stat {
    var st = stat()
    st.st_ino = UInt(ino)
    st.st_uid = 0
    st.st_gid = 0
    st.st_mtim = timespec(tv_sec: 1, tv_nsec: 0)
    st.st_atim = st.st_mtim
    st.st_ctim = st.st_mtim
    st.st_blksize = 65536
    switch kind {
    case .directory:
      st.st_mode = S_IFDIR | 0o555
      st.st_nlink = 2
      st.st_size = 4096
      st.st_blocks = 8
    case .regular(_, let size, let executable):
      st.st_mode = S_IFREG | (executable ? 0o555 : 0o444)
      st.st_nlink = 1
      st.st_size = Int(size)
      st.st_blocks = Int((size + 511) / 512)
    case .symlink(let target):
      st.st_mode = S_IFLNK | 0o777
      st.st_nlink = 1
      st.st_size = target.count
    }
    return st
  }

  package func directoryAttributes(ino: UInt64) -> stat {
    attributes(ino: ino, of: .directory(firstChild: 0, childCount: 0))
  }

  /// The inode number of a file content: 62 bits of its digest, so every copy of the same bytes
  /// anywhere in the mount is one inode. On the (astronomically rare) clash with another content
  /// the kernel still knows, the file falls back to a per-path inode: correct, just not shared.
  package func fileInode(path: StorePath, instance: UInt32, index: Int32, content: ContentID, size: UInt64, executable: Bool)
    -> UInt64
  {
    let number = Inode.fileNumber(content)
    let (clash, changed) = inodeTable.withLock { s -> (Bool, Bool) in
      if let known = s.files[number] {
        if known.content != content { return (true, false) }
        if known.path == path { return (false, false) }
      }
      // The latest path to show this content is the one to pin and re-fetch on open.
      s.files[number] = FileInfo(content: content, size: size, path: path)
      return (false, true)
    }
    // Before the reply, outside the lock (as in `instance`).
    if changed, let e = journal?.file(number, content: content, size: size, path: path) { journalFailed(e, "\(path): content \(content)") }
    return clash ? Inode.node(instance: instance, index: index) : Inode.file(content: number, executable: executable)
  }

  /// The inode of node `index` of `tree` as seen through `instance`, and its attributes.
  package func entry(_ tree: Manifest, path: StorePath, instance: UInt32, index: Int32) -> (UInt64, stat) {
    let kind = tree.nodes[Int(index)].kind
    let ino: UInt64
    if case .regular(let content, let size, let executable) = kind {
      ino = fileInode(path: path, instance: instance, index: index, content: content, size: size, executable: executable)
    } else {
      ino = Inode.node(instance: instance, index: index)
    }
    return (ino, attributes(ino: ino, of: kind))
  }
}
