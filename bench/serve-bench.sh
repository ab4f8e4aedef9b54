#!/usr/bin/env bash
# `make bench-serve`: nixfs serve's figures, side by side with nginx serving the same bytes.
#
#   bash bench/serve-bench.sh [PATH-TO-nixfs]        (default .build/release/nixfs; run as root)
#
# Builds one store path with real Nix in a private chroot store (a BIG_MB file of random data and
# SMALL_FILES files of 1-4 KiB), signs it, copies it to a zstd file:// binary cache served on
# 127.0.0.1 by scripts/cache-server.py (the upstream), starts `nixfs serve` with a chunk-index key,
# and measures, RUNS times each:
#   pull-through   the first narinfo request: upstream NAR download, decompress, verify, ingest
#   reassembly     GET of the held NAR, rebuilt from the chunk store
#   chunks-large   wrk over every chunk of 32 KiB or more, from nixfs serve and from nginx
#   chunks-small   wrk over every chunk under 32 KiB (packed small files, file tails), both
# nginx (Debian's nginx-light) serves the very bytes nixfs serve sent, at the same paths, as static
# files with sendfile. Writes OUT/serve-bench.md (OUT defaults to bench/serve). Runs under the shared
# benchmark lock; leaves no process behind.
#
# Environment: BIG_MB (256), SMALL_FILES (20000), RUNS (3), WRK_SECONDS (10), WRK_CONNECTIONS (32), OUT.
set -euo pipefail
export LC_ALL=C
repo=$(cd "$(dirname "$0")/.." && pwd)
nixfs=$(realpath "${1:-$repo/.build/release/nixfs}")
BIG_MB=${BIG_MB:-256}
SMALL_FILES=${SMALL_FILES:-20000}
RUNS=${RUNS:-3}
WRK_SECONDS=${WRK_SECONDS:-10}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-32}
OUT=${OUT:-$repo/bench/serve}
for tool in nginx wrk python3 nix-store; do
  command -v "$tool" >/dev/null || { echo "serve-bench: $tool is missing (apt-get install nginx-light wrk nix-bin)"; exit 1; }
done
# The project's Nix settings (scripts/nix/nix.conf) and none of the machine's.
export NIX_CONF_DIR="$repo/scripts/nix" NIX_USER_CONF_FILES= NIX_CONFIG= NIX_REMOTE=
exec 9>/tmp/nixfs-bench.lock
flock 9
work=$(mktemp -d /tmp/nixfs-serve-bench.XXXXXX)
upstream= serve= nginx_pid=
cleanup() {
  [ -n "$serve" ] && kill "$serve" 2>/dev/null && wait "$serve" 2>/dev/null || true
  [ -n "$upstream" ] && kill "$upstream" 2>/dev/null && wait "$upstream" 2>/dev/null || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }

say "fixture: ${BIG_MB} MiB file + $SMALL_FILES small files"
mkdir -p "$work/tree/small"
head -c $((BIG_MB << 20)) /dev/urandom > "$work/tree/big.bin"
python3 - "$work/tree/small" "$SMALL_FILES" <<'PY'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2]); r = random.Random(5)
for i in range(n):
    sub = os.path.join(d, "%03d" % (i // 100)); os.makedirs(sub, exist_ok=True)
    open(os.path.join(sub, "f%05d" % i), "wb").write(bytes(r.getrandbits(8) for _ in range(r.randint(1024, 4096))))
PY
path=$(nix-store --store "$work/root" --add "$work/tree")
nix-store --generate-binary-cache-key bench-up-1 "$work/up.sk" "$work/up.pk"
nix-store --generate-binary-cache-key bench-serve-1 "$work/serve.sk" "$work/serve.pk"
nix store sign --store "$work/root" --key-file "$work/up.sk" "$path"
nix copy --store "$work/root" --to "file://$work/cache?compression=zstd" "$path"
hash=$(basename "$path" | cut -c1-32)
narsize=$(sed -n 's/^NarSize: //p' "$work/cache/$hash.narinfo")

coproc UP { exec python3 "$repo/scripts/cache-server.py" --dir "$work/cache"; }
upstream=$UP_PID
read -r _ upport <&"${UP[0]}"

start_serve() {
  rm -rf "$work/state"
  coproc SERVE { exec "$nixfs" serve --state-dir "$work/state" --listen 127.0.0.1:0 --log-level warning \
    --substituter "http://127.0.0.1:$upport" --trusted-public-key "$(cat "$work/up.pk")" --secret-key-file "$work/serve.sk"; }
  serve=$SERVE_PID
  read -r line <&"${SERVE[0]}"
  url=${line##* }
}
get() { python3 -c 'import sys, time, urllib.request
t = time.monotonic(); n = len(urllib.request.urlopen(sys.argv[1]).read()); print(n, time.monotonic() - t)' "$1"; }

pull=() ; reasm=()
for run in $(seq "$RUNS"); do
  say "pull-through run $run"
  start_serve
  read -r _ s < <(get "$url/$hash.narinfo")
  pull+=("$(python3 -c "print(f'{$narsize / 2**20 / $s:.0f}')")")
  narurl=$(python3 -c 'import sys, urllib.request; t = urllib.request.urlopen(sys.argv[1]).read().decode()
print([l[5:] for l in t.splitlines() if l.startswith("URL: ")][0])' "$url/$hash.narinfo")
  sync; echo 3 > /proc/sys/vm/drop_caches
  read -r n s < <(get "$url/$narurl")
  reasm+=("$(python3 -c "print(f'{$n / 2**20 / $s:.0f}')")")
  if [ "$run" -lt "$RUNS" ]; then kill "$serve"; wait "$serve" 2>/dev/null || true; serve=; fi
done

say "chunks: exporting the served bytes for nginx"
narhash=$(sed -n 's/^NarHash: sha256://p' "$work/cache/$hash.narinfo")
mkdir -p "$work/www/nixfs/v1/chunks"
python3 - "$url" "$narhash" "$work/www/nixfs/v1/chunks" "$work" <<'PY'
import json, sys, urllib.request
url, narhash, out, work = sys.argv[1:5]
doc = json.loads(urllib.request.urlopen(f"{url}/nixfs/v1/manifests/{narhash}").read())
body = json.loads(doc["body"])
chunks = {c[0]: int(c[1]) for content in body["contents"].values() for c in content["chunks"]}
large, small = [], []
for hexid, size in sorted(chunks.items()):
    data = urllib.request.urlopen(f"{url}/nixfs/v1/chunks/{hexid}").read()
    open(f"{out}/{hexid}", "wb").write(data)
    (large if size >= 32 << 10 else small).append((hexid, len(data)))
for name, items in (("large", large), ("small", small)):
    with open(f"{work}/{name}.lua", "w") as f:
        f.write("paths = {" + ",".join('"/nixfs/v1/chunks/%s"' % h for h, _ in items) + "}\n")
        f.write("i = 0\nrequest = function() i = i % #paths + 1; return wrk.format(nil, paths[i]) end\n")
    sizes = [n for _, n in items]
    open(f"{work}/{name}.count", "w").write("%d %d\n" % (len(items), sum(sizes) // max(1, len(items))))
PY
cat > "$work/nginx.conf" <<NGINX
worker_processes 2;
user root;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  types { } default_type application/octet-stream;
  server { listen 127.0.0.1:0 reuseport; root $work/www; }
}
NGINX
ngport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -i "s/listen 127.0.0.1:0 reuseport/listen 127.0.0.1:$ngport/" "$work/nginx.conf"
nginx -c "$work/nginx.conf"
for _ in $(seq 50); do [ -f "$work/nginx.pid" ] && break; sleep 0.1; done
# Both must answer 200 with the same bytes, or the comparison means nothing.
first=$(sed -n 's/^paths = {"\([^"]*\)".*/\1/p' "$work/large.lua")
python3 - "$url$first" "http://127.0.0.1:$ngport$first" <<'PY'
import sys, urllib.request
a, b = (urllib.request.urlopen(u).read() for u in sys.argv[1:3])
assert a == b and a, "nginx and nixfs serve do not send the same chunk"
PY

wrkrun() { # base script -> "req/s MB/s"
  wrk -t2 -c"$WRK_CONNECTIONS" -d"${WRK_SECONDS}s" -s "$2" "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]B)", t); mb = float(m.group(1)) * {"KB": 1/1024, "MB": 1, "GB": 1024}[m.group(2)]
print(f"{rps:.0f} {mb:.0f}")'
}
declare -A res
for set in large small; do
  for run in $(seq "$RUNS"); do
    say "wrk $set run $run"
    res[serve-$set]+="$(wrkrun "$url" "$work/$set.lua");"
    res[nginx-$set]+="$(wrkrun "http://127.0.0.1:$ngport" "$work/$set.lua");"
  done
done

median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"; }
col() { echo "$1" | tr ';' '\n' | sed '/^$/d' | awk -v c="$2" '{print $c}'; }
mkdir -p "$OUT"
{
  echo "# nixfs serve figures"
  echo
  echo "\`make bench-serve\` on $(nproc) cores, $(date -u +%Y-%m-%d), $(basename "$nixfs") at $(git -C "$repo" rev-parse --short HEAD)."
  echo "One store path: a ${BIG_MB} MiB random file and $SMALL_FILES files of 1-4 KiB (NAR $((narsize >> 20)) MiB);"
  echo "upstream is a zstd file:// cache on 127.0.0.1 (scripts/cache-server.py). Medians of $RUNS runs;"
  echo "wrk -t2 -c$WRK_CONNECTIONS for ${WRK_SECONDS} s per run, client and servers on the same 2 cores."
  echo
  echo "| figure | nixfs serve | nginx (same bytes, static) | ratio |"
  echo "| --- | --- | --- | --- |"
  echo "| pull-through (cold path, first narinfo), MiB/s of NAR | $(median "${pull[@]}") | — | — |"
  echo "| NAR reassembly from the chunk store, MiB/s | $(median "${reasm[@]}") | — | — |"
  for set in large small; do
    read -r n avg < "$work/$set.count"
    s_r=$(median $(col "${res[serve-$set]}" 1)); n_r=$(median $(col "${res[nginx-$set]}" 1))
    s_m=$(median $(col "${res[serve-$set]}" 2)); n_m=$(median $(col "${res[nginx-$set]}" 2))
    echo "| chunks $set ($n chunks, mean $((avg >> 10)) KiB as sent): requests/s | $s_r | $n_r | $(python3 -c "print(f'{$s_r / $n_r:.2f}x')") |"
    echo "| chunks $set: MiB/s | $s_m | $n_m | $(python3 -c "print(f'{$s_m / max($n_m, 1):.2f}x')") |"
  done
  echo
  echo "Raw runs: pull-through ${pull[*]}; reassembly ${reasm[*]}; $(for k in "${!res[@]}"; do printf '%s %s ' "$k" "${res[$k]}"; done)"
} > "$OUT/serve-bench.md"
cat "$OUT/serve-bench.md"
