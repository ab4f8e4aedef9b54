#!/usr/bin/env bash
# `make bench-takeover` (issue 17): how long a reader waits while the node daemon is replaced.
#
#   bash bench/takeover-bench.sh [PATH-TO-nixfs]     (default .build/release/nixfs; run as root)
#
# Builds one store path (a BIG_MB file of random data and a small one) with real Nix, serves it from
# a file:// binary cache on 127.0.0.1, starts `nixfs keeper` and `nixfs mount --keeper`, reads the
# path once, then runs a reader that issues requests the daemon itself must answer, back to back:
#   meta  stat of a name never asked before (a lookup the kernel cannot answer from its cache;
#         not a store path name, so the daemon answers at once, without a cache request)
#   data  a 128 KiB pread at a random offset of the big file after POSIX_FADV_DONTNEED on it (the
#         pages are dropped, so the kernel asks the daemon)
# and records each request's latency. Phases, in one run:
#   steady    ANCHOR_SECONDS with no switch: the reader's own latency (the anchor)
#   takeover  TAKEOVERS times: a new `nixfs mount` takes the mount over from the running one
#   crash     CRASHES times: the daemon is killed with SIGKILL and a new one started at once (the
#             restart delay of kubelet excluded); the keeper holds the connection meanwhile
# For each switch, the pause is the longest request latency from the switch's start to 3 s after.
# Writes OUT/takeover-bench.json and OUT/takeover-bench.md (OUT defaults to bench/takeover/results).
# Leaves no mount or process behind, even on failure or Ctrl-C.
#
# Environment: BIG_MB (256), TAKEOVERS (10), CRASHES (5), ANCHOR_SECONDS (5), OUT, KEEP=1.
set -euo pipefail
export LC_ALL=C
repo=$(cd "$(dirname "$0")/.." && pwd)
nixfs=$(realpath "${1:-$repo/.build/release/nixfs}")
BIG_MB=${BIG_MB:-256}
TAKEOVERS=${TAKEOVERS:-10}
CRASHES=${CRASHES:-5}
ANCHOR_SECONDS=${ANCHOR_SECONDS:-5}
OUT=${OUT:-$repo/bench/takeover/results}
KEEP=${KEEP:-0}
case "$nixfs" in
  */release/*) label="release build" ;;
  */debug/*) label="DEBUG build" ;;
  *) label="unknown build" ;;
esac

say() { printf '== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "takeover-bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts)"
[ -x "$nixfs" ] || die "no nixfs binary at $nixfs"

work=$(mktemp -d /tmp/nixfs-takeover-bench.XXXXXX)
mnt=$work/mnt
pids=()
cleanup() {
  set +e
  [ -n "${reader:-}" ] && kill "$reader" 2>/dev/null
  pkill -f -- "--state-dir $work/state" 2>/dev/null
  sleep 0.5
  pkill -9 -f -- "--state-dir $work/state" 2>/dev/null
  fusermount3 -u -z "$mnt" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  [ "$KEEP" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

# ---- 1. A store path in a binary cache -------------------------------------------------------
export NIX_CONF_DIR=$repo/scripts/nix NIX_USER_CONF_FILES= NIX_CONFIG=
say "fixture: one path with a $BIG_MB MiB file"
mkdir -p "$work/tree"
head -c $((BIG_MB << 20)) /dev/urandom > "$work/tree/big"
echo hello > "$work/tree/hello"
path=$(nix-store --store "$work/store" --add "$work/tree")
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
nix store sign --store "$work/store" -k "$work/sk" "$path"
nix copy --store "$work/store" --to "file://$work/cache" "$path"
python3 "$repo/scripts/cache-server.py" --dir "$work/cache" --log "$work/cache.log" > "$work/port" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.05; done
port=$(cut -d' ' -f2 < "$work/port")

# ---- 2. Keeper and daemon --------------------------------------------------------------------
"$nixfs" keeper --socket "$work/keeper.sock" 2> "$work/keeper.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/keeper.sock" ] && break; sleep 0.05; done
args=(--state-dir "$work/state" --substituter "http://127.0.0.1:$port" --trusted-public-key "$(cat "$work/pk")"
  --keeper "$work/keeper.sock")
n=0
daemon() {
  n=$((n + 1))
  "$nixfs" mount "${args[@]}" "$mnt" 2> "$work/daemon-$n.log" &
  last=$!
}
wait_log() {  # wait_log FILE TEXT: until the daemon's log says TEXT (30 s at most)
  for _ in $(seq 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
  die "no '$2' in $1: $(tail -3 "$1")"
}
mkdir -p "$mnt"
daemon
for _ in $(seq 300); do mountpoint -q "$mnt" && break; sleep 0.05; done
base=$(basename "$path")
cat "$mnt/$base/hello" > /dev/null
cat "$mnt/$base/big" > /dev/null
sleep 0.5  # the keeper holds the connection by now

# ---- 3. The reader -----------------------------------------------------------------------------
cat > "$work/reader.py" <<'EOF'
import os, random, sys, time
root, big, out = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(big, os.O_RDONLY)
size = os.fstat(fd).st_size
i = 0
errors = 0
with open(out, "w", buffering=1) as log:
    while True:
        i += 1
        kind = "meta" if i % 2 else "data"
        t0 = time.monotonic()
        try:
            if kind == "meta":
                try:
                    os.stat(f"{root}/probe-{i}")
                except FileNotFoundError:
                    pass
            else:
                off = random.randrange(0, size - (128 << 10)) & ~4095
                os.posix_fadvise(fd, off, 128 << 10, os.POSIX_FADV_DONTNEED)
                os.pread(fd, 128 << 10, off)
            ok = 1
        except OSError as e:
            ok = 0
            errors += 1
            print(f"error {kind} {e}", file=sys.stderr, flush=True)
        t1 = time.monotonic()
        log.write(f"{t0:.6f} {t1 - t0:.6f} {kind} {ok}\n")
EOF
python3 "$work/reader.py" "$mnt" "$mnt/$base/big" "$work/latency.log" 2> "$work/reader.err" &
reader=$!
mark() { printf '%s %s %s\n' "$(python3 -c 'import time; print(f"{time.monotonic():.6f}")')" "$1" "$2" >> "$work/events.log"; }

say "steady: ${ANCHOR_SECONDS}s without a switch"
mark steady-start 0
sleep "$ANCHOR_SECONDS"
mark steady-end 0
for i in $(seq "$TAKEOVERS"); do
  old=$last
  mark takeover "$i"
  daemon
  wait_log "$work/daemon-$n.log" "took over the FUSE connection"
  wait "$old" 2>/dev/null || true
  sleep 3
done
say "takeovers: $TAKEOVERS"
for i in $(seq "$CRASHES"); do
  mark crash "$i"
  kill -9 "$last"
  wait "$last" 2>/dev/null || true
  daemon
  wait_log "$work/daemon-$n.log" "took over the FUSE connection"
  sleep 3
done
say "crashes: $CRASHES"
sleep 1
kill "$reader"
wait "$reader" 2>/dev/null || true
reader=

# ---- 4. Figures --------------------------------------------------------------------------------
mkdir -p "$OUT"
python3 - "$work/latency.log" "$work/events.log" "$work/reader.err" "$OUT" "$label" "$BIG_MB" <<'EOF'
import json, statistics, sys
lat_path, ev_path, err_path, out, label, big_mb = sys.argv[1:]
ops = []
for line in open(lat_path):
    p = line.split()
    if len(p) == 4:
        ops.append((float(p[0]), float(p[1]), p[2], p[3] == "1"))
events = [(float(t), k, int(i)) for t, k, i in (l.split() for l in open(ev_path))]
errors = sum(1 for o in ops if not o[3])
steady_start = next(t for t, k, _ in events if k == "steady-start")
steady_end = next(t for t, k, _ in events if k == "steady-end")
steady = [o[1] for o in ops if steady_start <= o[0] < steady_end]
def pause(t):
    # The longest request that was in progress at any time from the switch to 3 s after it.
    return max((o[1] for o in ops if o[0] + o[1] >= t and o[0] <= t + 3), default=0.0)
rounds = {"takeover": [], "crash": []}
for t, k, i in events:
    if k in rounds:
        rounds[k].append(pause(t))
def ms(x): return round(x * 1000, 1)
q = sorted(steady)
result = {
    "build": label, "big_file_mib": int(big_mb), "requests": len(ops), "failed_requests": errors,
    "steady": {"requests": len(steady), "median_ms": ms(statistics.median(q)), "p99_ms": ms(q[int(len(q) * 0.99)]),
               "max_ms": ms(q[-1])},
    "takeover_pause_ms": [ms(x) for x in rounds["takeover"]],
    "crash_pause_ms": [ms(x) for x in rounds["crash"]],
}
json.dump(result, open(f"{out}/takeover-bench.json", "w"), indent=2)
def row(name, xs):
    return f"| {name} | {len(xs)} | {ms(statistics.median(xs))} ms | {ms(max(xs))} ms |"
md = [
    "# Daemon takeover and crash: the longest pause a reader sees",
    "",
    f"`make bench-takeover` ({label}; one {big_mb} MiB path, reader alternating uncached lookups and",
    "128 KiB reads of dropped pages, every request answered by the daemon).",
    "",
    f"Requests: {len(ops)}, failed: **{errors}**.",
    "",
    "| phase | rounds | median of the longest request | worst |",
    "| --- | --- | --- | --- |",
    f"| steady (anchor: no switch, {len(steady)} requests; median {ms(statistics.median(q))} ms, p99 {ms(q[int(len(q) * 0.99)])} ms) | 1 | {ms(q[-1])} ms | {ms(q[-1])} ms |",
    row("takeover (a new `nixfs mount` takes the mount over)", rounds["takeover"]),
    row("crash (SIGKILL, a new daemon started at once)", rounds["crash"]),
    "",
    "Targets (issue 17): under 100 ms for a takeover, under 2 s from a crash to serving again",
    "(excluding kubelet's restart delay).",
    "",
]
open(f"{out}/takeover-bench.md", "w").write("\n".join(md))
print("\n".join(md))
if errors:
    print(open(err_path).read()[:2000], file=sys.stderr)
EOF
