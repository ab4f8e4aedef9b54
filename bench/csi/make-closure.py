#!/usr/bin/env python3
"""Writes a binary cache of N synthetic store paths forming one closure (wide and shallow, like a
system closure), with narinfos signed by a fresh Ed25519 key in Nix's format. No NARs: publishing
a volume reads narinfos only. Prints the root store path and the public key."""
import base64, hashlib, os, random, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
rng = random.Random(7)

def h32():
    return "".join(rng.choice(alphabet) for _ in range(32))

def nix32(b):
    n = (len(b) * 8 - 1) // 5 + 1
    s = []
    for i in range(n - 1, -1, -1):
        bit = i * 5; j, k = bit // 8, bit % 8
        c = b[j] >> k
        if j + 1 < len(b): c |= b[j + 1] << (8 - k)
        s.append(alphabet[c & 0x1f])
    return "".join(s)

key = Ed25519PrivateKey.generate()
pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
paths = [f"/nix/store/{h32()}-pkg-{i}" for i in range(n)]
# Levels of a wide, shallow closure: each path refers to a few paths of the next level.
levels, i, width = [], 0, 1
while i < n:
    levels.append(paths[i:i + width]); i += width; width = min(width * 6, n)
refs = {p: set() for p in paths}
for a, b in zip(levels, levels[1:]):
    for k, q in enumerate(b):
        refs[a[k % len(a)]].add(q)
    for p in a:
        refs[p].update(rng.sample(b, min(3, len(b))))
with open(f"{out}/nix-cache-info", "w") as f:
    f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
for p in paths:
    nar_hash = "sha256:" + nix32(hashlib.sha256(p.encode()).digest())
    r = sorted(refs[p])
    fp = f"1;{p};{nar_hash};1000;{','.join(r)}"
    sig = base64.b64encode(key.sign(fp.encode())).decode()
    with open(f"{out}/{p[11:43]}.narinfo", "w") as f:
        f.write(f"StorePath: {p}\nURL: nar/{p[11:43]}.nar\nCompression: none\nNarHash: {nar_hash}\nNarSize: 1000\n"
                f"References: {' '.join(os.path.basename(x) for x in r)}\nSig: bench-1:{sig}\n")
print(paths[0])
print("bench-1:" + base64.b64encode(pub).decode())
