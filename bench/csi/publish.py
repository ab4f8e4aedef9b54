#!/usr/bin/env python3
"""Drives NodePublishVolume / NodeUnpublishVolume as kubelet does, over the CSI Unix socket, and
prints the publish time in seconds. Usage: publish.py STUBS_DIR SOCKET STORE_PATH TARGET N [ro|rw]
(rw: readonly false, the overlay of a read-write volume)."""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import grpc, csi_pb2, csi_pb2_grpc

sock, path, target, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
readonly = (sys.argv[6] if len(sys.argv) > 6 else "ro") == "ro"
mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY if readonly else csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
node = csi_pb2_grpc.NodeStub(grpc.insecure_channel("unix://" + sock))
cap = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
req = csi_pb2.NodePublishVolumeRequest(volume_id="bench-vol", target_path=target, volume_capability=cap, readonly=readonly,
                                       volume_context={"x86_64-linux": path, "csi.storage.k8s.io/ephemeral": "true"})
node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())  # connection up before timing
t0 = time.monotonic()
node.NodePublishVolume(req, timeout=120)
elapsed = time.monotonic() - t0
# A read-write volume also lists the state layer's .links, as a real store does.
listed = len([e for e in os.listdir(os.path.join(target, "store")) if not e.startswith(".")])
node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="bench-vol", target_path=target))
if listed != n:
    sys.exit(f"the view lists {listed} paths, not {n}")
print(f"{elapsed:.4f}")
