#!/usr/bin/env bash
# `make soak-takeover` (issue 25): TakeoverTests.podsNeverNoticeTakeoversOrCrashes again and again
# beside a CPU-saturating load, as the one flaky run saw it (a full test run with a release build
# beside it). Each run is 10 takeovers and 6 crashes under a pod that execs, checksums and lists
# the store without pause; one failed read or exec fails the run. Stops at the first failure and
# keeps its log.
#
#   bash bench/takeover-soak.sh [RUNS]          (default 30; run as root, after `swift build --build-tests`)
#
# The load: one busy loop per core (`nice`d like a build, which does not yield to the test either).
# Writes bench/takeover/results/soak.md: runs passed, the first failure's output if any.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-30}
out=$repo/bench/takeover/results
mkdir -p "$out"
log=$(mktemp)
hogs=()
cleanup() { for p in "${hogs[@]}"; do kill "$p" 2>/dev/null; done; rm -f "$log"; }
trap cleanup EXIT INT TERM
for _ in $(seq "$(nproc)"); do
  nice -n 5 sh -c 'while :; do :; done' &
  hogs+=($!)
done
passed=0
started=$(date -u +%FT%TZ)
for i in $(seq "$runs"); do
  t0=$(date +%s)
  if (cd "$repo" && swift test --skip-build --filter 'TakeoverTests/podsNeverNoticeTakeoversOrCrashes') >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i: passed in $(($(date +%s) - t0)) s ($(grep -o 'takeover pod: .*' "$log" | head -1))"
  else
    echo "run $i: FAILED"
    cp "$log" "$out/soak-failure.log"
    break
  fi
done
{
  echo "# Takeover soak"
  echo
  echo "Started $started; $(nproc) busy loops beside the test. \`bash bench/takeover-soak.sh $runs\`."
  echo
  echo "**$passed of $runs runs passed** in a row (each: 10 takeovers and 6 crashes under a reading pod)."
  [ "$passed" -lt "$runs" ] && echo && echo "The first failure's output is in soak-failure.log."
} >"$out/soak.md"
cat "$out/soak.md"
[ "$passed" -eq "$runs" ]
