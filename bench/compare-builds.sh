#!/usr/bin/env bash
# Runs the three "no slower" benchmarks of a refactoring on two builds back to back, under the
# shared benchmark lock: bench-fs (nixfs only), bench-quick (the cold-start harness) and
# store-bench. BEFORE and AFTER are checkouts, each with its release build of nixfs and
# store-bench done (`swift build -c release --product nixfs --product store-bench`).
#
#   bash bench/compare-builds.sh /work/wt-base /work/main [OUT]
#
# Writes OUT/{before,after}/{fs,quick,store}/ (OUT defaults to bench/compare/results); the
# reports are the benchmarks' own (fs-bench.md, benchmarks.md, store-bench.txt).
set -euo pipefail
before=$(realpath "$1")
after=$(realpath "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${3:-$repo/bench/compare/results}")
say() { printf '== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
for tree in "$before" "$after"; do
  for bin in nixfs store-bench; do
    [ -x "$tree/.build/release/$bin" ] || { echo "no release $bin in $tree (build it first)" >&2; exit 2; }
  done
done
exec 9>/tmp/nixfs-bench.lock
say "waiting for /tmp/nixfs-bench.lock"
flock 9
for side in before after; do
  tree=$before
  [ "$side" = after ] && tree=$after
  mkdir -p "$out/$side/fs" "$out/$side/quick" "$out/$side/store"
  say "$side: bench-fs ($tree)"
  BIG_MB=${BIG_MB:-256} SMALL_FILES=${SMALL_FILES:-20000} RUNS=${RUNS:-3} OUT="$out/$side/fs" LABEL="$side ($(git -C "$tree" rev-parse --short HEAD))" \
    bash "$repo/bench/fs-bench.sh" "$tree/.build/release/nixfs" > "$out/$side/fs/log.txt" 2>&1
  say "$side: store-bench"
  "$tree/.build/release/store-bench" > "$out/$side/store/store-bench.txt" 2>&1
  say "$side: bench-quick"
  python3 "$repo/bench/coldstart/harness.py" --nixfs "$tree/.build/release/nixfs" --quick --runs 3 \
    --out "$out/$side/quick" --command "bench/compare-builds.sh ($side)" > "$out/$side/quick/log.txt" 2>&1
done
say "done: $out"
