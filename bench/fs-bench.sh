#!/usr/bin/env bash
# `make bench-fs` (issue 5): filesystem figures for nixfs against the local disk and squashfuse.
#
#   bash bench/fs-bench.sh [PATH-TO-nixfs]        (default .build/release/nixfs; run as root)
#
# Builds two fixture trees (one BIG_MB file of random data; SMALL_FILES files of 0-4 KiB in
# directories of FILES_PER_DIR), adds and signs them with real Nix in a private chroot store, copies
# them to a file:// binary cache served by scripts/cache-server.py on 127.0.0.1, mounts nixfs on an
# empty state directory and reads both paths once (first access), builds a zstd squashfs image of
# the same two trees mounted with squashfuse, then measures, RUNS times each and interleaved across
# the local disk, nixfs and squashfuse:
#   read-warm     dd of the big file, after one priming read (page cache warm)
#   read-cold     the same after `echo 3 > drop_caches` (chunks on local disk, not in page cache)
#   read-restart  the same after restarting both FUSE daemons too (their own caches empty)
#   meta-warm / meta-cold / meta-restart
#                 `find DIR -printf '%s %i\n'` (stats every entry) over the small tree
#   ttfb-cold     `head -c1` of one small file after drop_caches
# Writes OUT/fs-bench.json and OUT/fs-bench.md (OUT defaults to bench/fs/results) and copies the
# daemons' stderr there. Leaves no mount or process behind, even on failure or Ctrl-C.
#
# Environment: BIG_MB (1024), SMALL_FILES (100000), FILES_PER_DIR (100), RUNS (5), OUT,
# LABEL (build label for the report; guessed from the binary's path), KEEP=1 (keep the work dir).
set -euo pipefail
export LC_ALL=C
repo=$(cd "$(dirname "$0")/.." && pwd)
nixfs=$(realpath "${1:-$repo/.build/release/nixfs}")
BIG_MB=${BIG_MB:-1024}
SMALL_FILES=${SMALL_FILES:-100000}
FILES_PER_DIR=${FILES_PER_DIR:-100}
RUNS=${RUNS:-5}
MMAP_FAULTS=${MMAP_FAULTS:-20000}
OUT=${OUT:-$repo/bench/fs/results}
KEEP=${KEEP:-0}
case "$nixfs" in
  */release/*) guess="release build" ;;
  */debug/*) guess="DEBUG build" ;;
  *) guess="unknown build" ;;
esac
LABEL=${LABEL:-$guess}

say() { printf '== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "fs-bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE mounts, apt-get)"
[ -x "$nixfs" ] || die "no nixfs binary at $nixfs"

# ---- 1. What we need -------------------------------------------------------------------------
need=()
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v squashfuse >/dev/null || need+=(squashfuse)
command -v nix-store >/dev/null || need+=(nix-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The project's Nix settings (scripts/nix/nix.conf) and none of the machine's.
export NIX_CONF_DIR="$repo/scripts/nix" NIX_USER_CONF_FILES= NIX_CONFIG= NIX_REMOTE=
work=$(mktemp -d /tmp/nixfs-fsbench.XXXXXX)
mnt=$work/mnt mnt2=$work/mnt-nopt sq=$work/sq fix=$work/fixtures
mkdir -p "$mnt" "$mnt2" "$sq" "$fix" "$OUT"
daemon= daemon2= squash= server=
# The systems measured, side by side: nixfs with FUSE passthrough (the default) and without.
SYSTEMS="disk nixfs nixfs-nopt squashfuse"

stop_daemon() { # PID MOUNTPOINT
  if [ -n "$1" ]; then
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
  if mountpoint -q "$2" 2>/dev/null; then fusermount3 -u -z "$2" || true; fi
}
stop_nixfs() { stop_daemon "$daemon" "$mnt"; daemon=; }
stop_nixfs2() { stop_daemon "$daemon2" "$mnt2"; daemon2=; }
stop_squashfuse() {
  if mountpoint -q "$sq" 2>/dev/null; then fusermount3 -u "$sq" 2>/dev/null || fusermount3 -u -z "$sq" || true; fi
  if [ -n "$squash" ]; then
    kill -TERM "$squash" 2>/dev/null || true
    wait "$squash" 2>/dev/null || true
    squash=
  fi
}
cleanup() {
  set +e
  stop_nixfs
  stop_nixfs2
  stop_squashfuse
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  [ -f "$work/nixfs.log" ] && cp "$work/nixfs.log" "$OUT/nixfs-stderr.log"
  [ -f "$work/nixfs-nopt.log" ] && cp "$work/nixfs-nopt.log" "$OUT/nixfs-nopt-stderr.log"
  [ -f "$work/squashfuse.log" ] && cp "$work/squashfuse.log" "$OUT/squashfuse-stderr.log"
  if [ "$KEEP" = 1 ]; then
    echo "fs-bench: work dir kept at $work"
  else
    chmod -R u+w "$work" 2>/dev/null
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_mount() { # DIR PID NAME
  for _ in $(seq 300); do
    mountpoint -q "$1" && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited before mounting (see $work/$3.log)"
    sleep 0.1
  done
  die "$3 did not mount $1 within 30 s"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metrics_port=$(free_port)
metrics_port2=$(free_port)
start_nixfs2() {
  "$nixfs" mount --state-dir "$work/state-nopt" --substituter "http://127.0.0.1:$port" \
    --trusted-public-key "$(cat "$work/pk")" --metrics-listen "127.0.0.1:$metrics_port2" \
    --log-level warning --passthrough off "$mnt2" 2>>"$work/nixfs-nopt.log" &
  daemon2=$!
  wait_mount "$mnt2" "$daemon2" nixfs-nopt
}
start_nixfs() {
  "$nixfs" mount --state-dir "$work/state" --substituter "http://127.0.0.1:$port" \
    --trusted-public-key "$(cat "$work/pk")" --metrics-listen "127.0.0.1:$metrics_port" \
    --log-level warning "$mnt" 2>>"$work/nixfs.log" &
  daemon=$!
  wait_mount "$mnt" "$daemon" nixfs
}
start_squashfuse() {
  squashfuse -f "$work/image.sqfs" "$sq" 2>>"$work/squashfuse.log" &
  squash=$!
  wait_mount "$sq" "$squash" squashfuse
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# FUSE request counters of the nixfs daemon, as "op=n ..." (empty if the endpoint does not answer).
fuse_counts() { # [PORT] [PID]
  local p=${1:-$metrics_port} pid=${2:-$daemon}
  # The daemon's CPU time (user + system, in clock ticks) beside its request counters.
  [ -n "$pid" ] && awk '{ printf "cpu_ticks=%s ", $14 + $15 }' "/proc/$pid/stat" 2>/dev/null
  curl -s --max-time 5 "http://127.0.0.1:$p/metrics" 2>/dev/null |
    awk '/^nixfs_fuse_requests_total/ && match($0, /op="[^"]*"/) { printf "%s=%s ", substr($0, RSTART + 4, RLENGTH - 5), $NF }
         /^nixfs_served_bytes_total/ { printf "bytes=%s ", $NF }' || true
}
counts_diff() { # BEFORE AFTER -> JSON object of the differences
  python3 -c '
import json, sys
p = lambda s: {k: float(v) for k, _, v in (x.partition("=") for x in s.split()) if v}
b, a = p(sys.argv[1]), p(sys.argv[2])
print(json.dumps({k: int(a[k] - b.get(k, 0)) for k in a if a[k] != b.get(k, 0)}))' "$1" "$2"
}

# ---- 2. Fixtures, Nix store, signed cache -----------------------------------------------------
{
  echo "NIXFS=$nixfs"
  echo "BUILD_LABEL=$LABEL"
  echo "NIXFS_VERSION=$("$nixfs" --version 2>&1 | head -1)"
  echo "SQUASHFUSE_VERSION=$(dpkg-query -W -f='${Version}' squashfuse 2>/dev/null)"
  echo "MKSQUASHFS_VERSION=$(dpkg-query -W -f='${Version}' squashfs-tools 2>/dev/null)"
  echo "NIX_VERSION=$(nix-store --version | head -1)"
  echo "CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  echo "NPROC=$(nproc)"
  echo "MEM=$(awk '/MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
  echo "KERNEL=$(uname -r)"
  echo "DISK=$(findmnt -no FSTYPE,SOURCE -T "$work" | tr -s ' ')"
  echo "BIG_MB=$BIG_MB"
  echo "SMALL_FILES=$SMALL_FILES"
  echo "FILES_PER_DIR=$FILES_PER_DIR"
  echo "RUNS=$RUNS"
  echo "MMAP_FAULTS=$MMAP_FAULTS"
  echo "DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "TOP_START=$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{printf "%s(%s%%) ", $2, $1}')"
} >"$work/meta.env"
: >"$work/raw.tsv"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); build: $LABEL ($nixfs)"

say "fixtures: ${BIG_MB} MiB random file; $SMALL_FILES files of 0-4 KiB, $FILES_PER_DIR per directory"
mkdir -p "$fix/fsbench-big" "$fix/fsbench-small"
head -c "${BIG_MB}M" /dev/urandom >"$fix/fsbench-big/data.bin"
python3 "$repo/bench/fs/make-tree.py" "$fix/fsbench-small" "$SMALL_FILES" "$FILES_PER_DIR" | sed 's/^/   /'
big_bytes=$(stat -c %s "$fix/fsbench-big/data.bin")

say "adding to a chroot Nix store, signing, nix copy to a zstd file:// cache"
bigsp=$(nix-store --store "$work/root" --add "$fix/fsbench-big")
smallsp=$(nix-store --store "$work/root" --add "$fix/fsbench-small")
nix-store --generate-binary-cache-key fsbench-key-1 "$work/sk" "$work/pk"
nix store sign --store "$work/root" --key-file "$work/sk" "$bigsp" "$smallsp"
nix copy --store "$work/root" --to "file://$work/cache?compression=zstd" "$bigsp" "$smallsp"
echo "   $bigsp"$'\n'"   $smallsp"
for p in "$bigsp" "$smallsp"; do
  n=$(basename "$p" | cut -c1-32)
  echo "NARINFO_$(basename "$p" | cut -c34- | tr a-z- A-Z_)=$(sed -n 's/^\(FileSize\|NarSize\): //p' "$work/cache/$n.narinfo" | paste -sd/)" >>"$work/meta.env"
done

coproc SERVER { exec python3 "$repo/scripts/cache-server.py" --dir "$work/cache" --log "$work/requests.log" --max-seconds 7200; }
server=$SERVER_PID
read -r _ port <&"${SERVER[0]}"

# ---- 3. Mount nixfs (first access) and squashfuse ---------------------------------------------
say "mounting nixfs (empty state dir) from http://127.0.0.1:$port; first access of both paths"
start_nixfs
start_nixfs2
for p in "$bigsp" "$smallsp"; do
  ls "$mnt2/$(basename "$p")" >/dev/null
  name=$(basename "$p")
  t0=$EPOCHREALTIME
  ls "$mnt/$name" >/dev/null # the first lookup fetches, verifies and ingests the whole path
  t1=$EPOCHREALTIME
  printf 'first-access\t%s\t1\t%s\t%s\t0\t-\n' "$(echo "$name" | cut -c34-)" "$t0" "$t1" >>"$work/raw.tsv"
  echo "   $name: $(python3 -c "print(f'{$t1 - $t0:.1f}')") s"
done
nb=$mnt/$(basename "$bigsp") ns=$mnt/$(basename "$smallsp")
nb2=$mnt2/$(basename "$bigsp") ns2=$mnt2/$(basename "$smallsp")
say "checking nixfs against the original trees (also reads every file once)"
cmp "$fix/fsbench-big/data.bin" "$nb/data.bin" || die "the big file differs on nixfs"
diff -rq "$fix/fsbench-small" "$ns" >/dev/null || die "the small tree differs on nixfs"
cmp "$fix/fsbench-big/data.bin" "$nb2/data.bin" || die "the big file differs on nixfs --passthrough off"
diff -rq "$fix/fsbench-small" "$ns2" >/dev/null || die "the small tree differs on nixfs --passthrough off"
# The first open made the big file's backing file in the background: wait for it.
for _ in $(seq 600); do
  [ -n "$(find "$work/state/backing" -maxdepth 1 -type f -size +1M 2>/dev/null)" ] && break
  sleep 0.1
done
echo "PASSTHROUGH=$("$nixfs" status --state-dir "$work/state" 2>/dev/null | sed -n 's/^passthrough: //p')" >>"$work/meta.env"
echo "   passthrough: $(sed -n 's/^PASSTHROUGH=//p' "$work/meta.env")"
"$nixfs" stats --state-dir "$work/state" --json >"$work/stats.json" 2>/dev/null || true
echo "NIXFS_STATS=$(tr -d '\n ' <"$work/stats.json")" >>"$work/meta.env"

say "building a zstd squashfs image of the same trees; mounting it with squashfuse"
mksquashfs "$fix/fsbench-big" "$fix/fsbench-small" "$work/image.sqfs" -comp zstd -noappend -quiet >/dev/null
echo "SQUASHFS_IMAGE_BYTES=$(stat -c %s "$work/image.sqfs")" >>"$work/meta.env"
start_squashfuse
qb=$sq/fsbench-big qs=$sq/fsbench-small
cmp "$fix/fsbench-big/data.bin" "$qb/data.bin" || die "the big file differs on squashfuse"
[ "$(find "$qs" -type f | wc -l)" = "$SMALL_FILES" ] || die "squashfuse shows a different file count"

big_of() { case $1 in disk) echo "$fix/fsbench-big/data.bin" ;; nixfs) echo "$nb/data.bin" ;; nixfs-nopt) echo "$nb2/data.bin" ;; squashfuse) echo "$qb/data.bin" ;; esac; }
tree_of() { case $1 in disk) echo "$fix/fsbench-small" ;; nixfs) echo "$ns" ;; nixfs-nopt) echo "$ns2" ;; squashfuse) echo "$qs" ;; esac; }
mid=$(ls "$fix/fsbench-small" | sed -n "$(( (SMALL_FILES / FILES_PER_DIR) / 2 + 1 ))p")
small_file=$mid/$(ls "$fix/fsbench-small/$mid" | sed -n "$(( $(ls "$fix/fsbench-small/$mid" | wc -l) / 2 + 1 ))p")

restart_daemons() {
  stop_nixfs
  stop_nixfs2
  stop_squashfuse
  start_nixfs
  start_nixfs2
  start_squashfuse
}

# ---- 4. Measurements ----------------------------------------------------------------------------
op() { # KIND SYSTEM: the measured operation
  case $1 in
    read) dd if="$(big_of "$2")" of=/dev/null bs=1M status=none ;;
    meta) find "$(tree_of "$2")" -printf '%s %i\n' >/dev/null ;;
    ttfb) head -c1 "$(tree_of "$2")/$small_file" >/dev/null ;;
    # MMAP_FAULTS random 4 KiB pages of the big file, touched through mmap (a loader's pattern).
    mmap) python3 -c '
import mmap, random, sys
f = open(sys.argv[1], "rb"); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
pages = len(m) // 4096; r = random.Random(7); s = 0
for _ in range(int(sys.argv[2])): s += m[r.randrange(pages) * 4096]
' "$(big_of "$2")" "$MMAP_FAULTS" ;;
  esac
}
group() { # GROUP KIND MODE(warm|cold|restart) BYTES
  local g=$1 kind=$2 mode=$3 bytes=$4 i s t0 t1 before after extra
  say "$g ($RUNS runs; load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo "LOAD_${g//-/_}=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"
  if [ "$mode" = warm ]; then for s in $SYSTEMS; do op "$kind" "$s"; done; fi
  for i in $(seq "$RUNS"); do
    [ "$mode" = restart ] && restart_daemons
    for s in $SYSTEMS; do
      [ "$mode" = warm ] || drop_caches
      case $s in nixfs) before=$(fuse_counts) ;; nixfs-nopt) before=$(fuse_counts "$metrics_port2" "$daemon2") ;; esac
      t0=$EPOCHREALTIME
      op "$kind" "$s"
      t1=$EPOCHREALTIME
      extra=-
      case $s in
        nixfs) after=$(fuse_counts) ;;
        nixfs-nopt) after=$(fuse_counts "$metrics_port2" "$daemon2") ;;
        *) after= ;;
      esac
      [ -n "$after" ] && extra=$(counts_diff "$before" "$after")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$g" "$s" "$i" "$t0" "$t1" "$bytes" "$extra" >>"$work/raw.tsv"
      printf '   run %s %-10s %8.3f s\n' "$i" "$s" "$(python3 -c "print($t1 - $t0)")"
    done
  done
}
group read-warm read warm "$big_bytes"
group read-cold read cold "$big_bytes"
group mmap-cold mmap cold "$((MMAP_FAULTS * 4096))"
group meta-warm meta warm 0
group meta-cold meta cold 0
group ttfb-cold ttfb cold 0
group read-restart read restart "$big_bytes"
group meta-restart meta restart 0

# ---- 5. Report --------------------------------------------------------------------------------
echo "LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"
echo "TOP_END=$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{printf "%s(%s%%) ", $2, $1}')" >>"$work/meta.env"
echo "NIXFS_STDERR_LINES=$(wc -l <"$work/nixfs.log")" >>"$work/meta.env"
echo "NIXFS_STDERR_ERRORS=$(grep -ci 'error\|fatal\|crash' "$work/nixfs.log" || true)" >>"$work/meta.env"
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
cp "$work/raw.tsv" "$OUT/fs-bench-raw.tsv"
python3 "$repo/bench/fs/report.py" "$work" "$OUT/fs-bench.json" "$OUT/fs-bench.md"
echo
echo "fs-bench: wrote $OUT/fs-bench.json and $OUT/fs-bench.md"
