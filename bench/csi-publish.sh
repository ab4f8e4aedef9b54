#!/usr/bin/env bash
# Publish latency of an N-path closure (default 1,000) from a cache LATENCY_MS away (default 20),
# on a cold node (empty state directory), measured as kubelet sees it: NodePublishVolume over the
# CSI socket until it returns. Nothing but narinfos crosses the wire. Median of RUNS (default 5).
set -euo pipefail
nixfs=${1:-.build/release/nixfs}
N=${N:-1000} LATENCY_MS=${LATENCY_MS:-20} RUNS=${RUNS:-5}
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

times=()
for run in $(seq "$RUNS"); do
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
  t=$(python3 "$here/csi/publish.py" "$work" "$sock" "$root" "$work/target-$run" "$N")
  times+=("$t")
  echo "run $run: publish of a $N-path closure, ${LATENCY_MS} ms away, cold node: $t s"
  kill -TERM "$csipid" "$mountpid"; wait "$csipid" "$mountpid" 2>/dev/null || true
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "median %.3f s (min %.3f, max %.3f) over %d runs\n", a[int((NR+1)/2)], a[1], a[NR], NR}'
