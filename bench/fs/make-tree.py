#!/usr/bin/env python3
"""Fixture for bench/fs-bench.sh: DIR/dNNNN/fNNN, FILES small files in dirs of PER_DIR files.

Sizes are uniform in 0..4096 bytes; contents are base64 text from a seeded generator (compressible
like source files, every file distinct). Deterministic: the same arguments give the same tree.
usage: make-tree.py DIR FILES PER_DIR
"""
import base64, os, random, sys

root, files, per_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(5)
dirs = (files + per_dir - 1) // per_dir
width = max(4, len(str(dirs)))
made = 0
for d in range(dirs):
    sub = os.path.join(root, f"d{d:0{width}d}")
    os.makedirs(sub)
    for f in range(min(per_dir, files - made)):
        size = rng.randint(0, 4096)
        data = base64.b64encode(rng.randbytes(size * 3 // 4 + 3))[:size]
        with open(os.path.join(sub, f"f{f:03d}"), "wb") as fh:
            fh.write(data)
        made += 1
print(f"{made} files in {dirs} directories")
