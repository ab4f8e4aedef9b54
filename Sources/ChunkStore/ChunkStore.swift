// The deduplicated chunk store: content-defined chunks, zstd, SQLite index, GC, fsck.
