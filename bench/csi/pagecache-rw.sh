#!/usr/bin/env bash
# Page cache of read-write volumes (issue 27), beside read-only ones and per-volume copies: PODS
# pods (default 4) of each kind read the same FILE_MB file (default 64) of one closure, each pod in a
# mount namespace of its own with its volume at /nix, as kubelet's bind makes it. Reported: how much
# the page cache grew (Cached in /proc/meminfo, after dropping caches) per kind:
#   read-only   nixfs volumes, a read-only bind of the node's view
#   read-write  nixfs volumes, an overlayfs of Nix's state over the view with an upper of their own
#   copies      the same file copied per volume on the node's disk (what a per-volume tree costs
#               once its files are not hardlinks of one: nix-csi's own read-write overlay copies
#               nothing, but its store is per node, not shared with a lazily fetched one)
# Needs root, nix-bin, python3 with grpcio-tools (installed if missing). Writes OUT (default
# bench/csi/pagecache-rw.md).
#
#   bash bench/csi/pagecache-rw.sh [PATH-TO-nixfs]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
nixfs=$(realpath "${1:-$repo/.build/release/nixfs}")
PODS=${PODS:-4} FILE_MB=${FILE_MB:-64}
OUT=${OUT:-$here/pagecache-rw.md}
python3 -c 'import grpc, grpc_tools' 2>/dev/null || pip install -q grpcio grpcio-tools
work=$(mktemp -d /tmp/nixfs-pagecache-rw.XXXXXX)
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
export NIX_CONF_DIR=$repo/scripts/nix NIX_USER_CONF_FILES= NIX_CONFIG= NIX_REMOTE=

# One store path with one big file, signed, in a file:// cache served on 127.0.0.1.
mkdir -p "$work/tree"
head -c $((FILE_MB << 20)) /dev/urandom > "$work/tree/big"
store=$work/nix-root
path=$(nix-store --store "$store" --add "$work/tree")
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
nix store sign --store "$store" --key-file "$work/sk" "$path"
nix copy --store "$store" --to "file://$work/cache?compression=zstd" "$path"
coproc SERVER { exec python3 "$repo/scripts/cache-server.py" --dir "$work/cache"; }
pids+=("$SERVER_PID")
read -r _ port <&"${SERVER[0]}"
python3 -m grpc_tools.protoc -I "$repo/spec/csi" --python_out="$work" --grpc_python_out="$work" csi.proto

mkdir -p "$work/mnt"
"$nixfs" mount --state-dir "$work/state" --substituter "http://127.0.0.1:$port" --trusted-public-key "$(cat "$work/pk")" \
  --log-level error "$work/mnt" &
pids+=($!)
for _ in $(seq 200); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
"$nixfs" csi --state-dir "$work/state" --endpoint "unix://$work/csi.sock" --node-id bench --log-level error &
pids+=($!)
for _ in $(seq 200); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done

publish() { # VOLUME TARGET ro|rw
  python3 - "$work" "$work/csi.sock" "$path" "$2" "$1" "$3" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import grpc, csi_pb2, csi_pb2_grpc
sock, path, target, volume, access = sys.argv[2:7]
ro = access == "ro"
m = csi_pb2.VolumeCapability.AccessMode
cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=m(mode=m.SINGLE_NODE_READER_ONLY if ro else m.SINGLE_NODE_WRITER))
csi_pb2_grpc.NodeStub(grpc.insecure_channel("unix://" + sock)).NodePublishVolume(
    csi_pb2.NodePublishVolumeRequest(volume_id=volume, target_path=target, volume_capability=cap, readonly=ro,
        volume_context={"storePath": path}), timeout=120)
PY
}
cached() { awk '/^Cached:/ {print $2 * 1024}' /proc/meminfo; }
name=$(basename "$path")
for i in $(seq "$PODS"); do
  publish "ro-$i" "$work/pods/ro-$i" ro
  publish "rw-$i" "$work/pods/rw-$i" rw
  mkdir -p "$work/copies/$i/store/$name"
  cp "$work/tree/big" "$work/copies/$i/store/$name/big"
done
# The file is fetched once, before any measurement: what is compared is the page cache, not the fetch.
cat "$work/mnt/$name/big" > /dev/null
declare -A grew
for kind in ro rw copies; do
  sync
  echo 3 > /proc/sys/vm/drop_caches
  before=$(cached)
  for i in $(seq "$PODS"); do
    src=$([ "$kind" = copies ] && echo "$work/copies/$i" || echo "$work/pods/$kind-$i")
    unshare -m --propagation private sh -c "mkdir -p /nix && mount --rbind '$src' /nix && cat /nix/store/$name/big > /dev/null"
  done
  grew[$kind]=$(( $(cached) - before ))
done
mib() { python3 -c "print(f'{int(\"$1\") / 2**20:.1f} MiB')"; }
{
  echo "| $PODS pods reading one ${FILE_MB} MiB file | page cache growth | per pod |"
  echo "| --- | --- | --- |"
  for kind in ro rw copies; do
    label=$([ "$kind" = ro ] && echo "nixfs read-only volumes" || { [ "$kind" = rw ] && echo "nixfs read-write volumes (overlay)" || echo "a copy per volume"; })
    echo "| $label | $(mib "${grew[$kind]}") | $(mib $(( grew[$kind] / PODS ))) |"
  done
} | tee "$OUT"
