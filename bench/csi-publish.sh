#!/usr/bin/env bash
# Publish latency of an N-path closure (default 1,000) from a cache LATENCY_MS away (default 20),
# on a cold node (empty state directory), measured as kubelet sees it: NodePublishVolume over the
# CSI socket until it returns. Nothing but narinfos crosses the wire. Median of RUNS (default 5).
# Read-only and read-write volumes (issue 27: an overlay over the view, with Nix's database) side
# by side: each run is a cold publish of one kind (alternating), then on that node, now warm, one
# of each (the database made, the narinfos known: what a second pod of the closure costs).
set -euo pipefail
nixfs=${1:-.build/release/nixfs}
N=${N:-1000} LATENCY_MS=${LATENCY_MS:-20} RUNS=${RUNS:-5}
# ACCESS=ro: cold read-only publishes only (a build older than read-write volumes).
accesses=${ACCESS:-ro rw}
here=$(cd "$(dirname "$0")" && pwd)
python3 -c 'import grpc, grpc_tools, cryptography' 2>/dev/null || pip install -q grpcio grpcio-tools cryptography
work=$(mktemp -d /tmp/nixfs-csi-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for m in $(grep -o "$work[^ ]*" /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{ read -r root; read -r key; } < <(python3 "$here/csi/make-closure.py" "$work/cache" "$N")
spec=${CSI_SPEC:-$(cd "$here/.." && pwd)/spec/csi}
python3 -m grpc_tools.protoc -I "$spec" --python_out="$work" --grpc_python_out="$work" csi.proto
coproc SERVER { exec python3 "$here/coldstart/netsim.py" "$work/cache" "$LATENCY_MS"; }
pids+=("$SERVER_PID")
read -r _ port <&"${SERVER[0]}"

declare -A cold warm
for access in ro rw; do cold[$access]=""; warm[$access]=""; done
for run in $(seq $((2 * RUNS))); do
  access=$([ $((run % 2)) -eq 1 ] || [ "$accesses" = ro ] && echo ro || echo rw)
  state=$work/state-$run mnt=$work/mnt-$run sock=$work/csi-$run.sock
  mkdir -p "$mnt"
  "$nixfs" mount --state-dir "$state" --substituter "http://127.0.0.1:$port" --trusted-public-key "$key" \
    --log-level error "$mnt" &
  mountpid=$!
  pids+=("$mountpid")
  for _ in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.05; done
  "$nixfs" csi --state-dir "$state" --endpoint "unix://$sock" --node-id bench --log-level error &
  csipid=$!
  pids+=("$csipid")
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  t=$(python3 "$here/csi/publish.py" "$work" "$sock" "$root" "$work/target-$run" "$N" "$access")
  cold[$access]+="$t "
  # COLD_ONLY=1: only the cold publish (to compare with builds that publish one volume per node).
  [ "${COLD_ONLY:-0}" = 1 ] || for w in ro rw; do
    tw=$(python3 "$here/csi/publish.py" "$work" "$sock" "$root" "$work/target-$run-$w" "$N" "$w")
    warm[$w]+="$tw "
  done
  echo "run $run: cold $access publish of a $N-path closure, ${LATENCY_MS} ms away: $t s"
  kill -TERM "$csipid" "$mountpid"; wait "$csipid" "$mountpid" 2>/dev/null || true
done
med() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {printf "%.4f s (%.4f-%.4f)", a[int((NR+1)/2)], a[1], a[NR]}'; }
diffms() { python3 -c 'import sys, statistics as s; a=[float(x) for x in sys.argv[1].split()]; b=[float(x) for x in sys.argv[2].split()]; print(f"{(s.median(b)-s.median(a))*1000:+.1f} ms")' "$1" "$2"; }
{
  echo "| publish of a $N-path closure, cache ${LATENCY_MS} ms away | read-only (bind) | read-write (overlay) | read-write minus read-only |"
  echo "| --- | --- | --- | --- |"
  echo "| cold node (median of $RUNS, min-max) | $(med "${cold[ro]}") | $(med "${cold[rw]}") | $(diffms "${cold[ro]}" "${cold[rw]}") |"
  echo "| warm node, closure's database made (median of $((2 * RUNS))) | $(med "${warm[ro]}") | $(med "${warm[rw]}") | $(diffms "${warm[ro]}" "${warm[rw]}") |"
} | tee "${OUT:-$here/csi/publish.md}"
