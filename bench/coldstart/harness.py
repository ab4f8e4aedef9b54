#!/usr/bin/env python3
"""Cold-start benchmark: how long until a program in a pod has finished, when its Nix closure
comes from a binary cache some distance away, eagerly (what nix-csi and node-level Nix daemons do)
and through nixfs. `make bench` / `make bench-quick`; see Documentation/benchmarks.md.

Modes (each run starts from a dropped page cache unless it says hot):
  eager           `nix copy --from CACHE` into an empty store, then run the program
  eager-warm      the program again from that store (local disk), page cache dropped: the fair
                  floor for nixfs-warm (every byte local, none cached)
  nixfs-cold      empty state dir: CSI NodePublishVolume, then run (paths fetched on first access)
  nixfs-prefetch  empty state dir: `nixfs fetch` of the closure, NodePublishVolume, run
  nixfs-warm      state dir populated (chunks, and the backing files made after the cold run),
                  daemon restarted: NodePublishVolume, run
  nixfs-hot       right after a run, a second pod on the same node: NodePublishVolume, run

Everything runs for real: Nix (nix-bin) for the fixtures and the eager mode, the nixfs mount
and CSI daemons, a gRPC client speaking CSI as kubelet does, pods as private mount namespaces."""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import fixtures  # noqa: E402
import netsim  # noqa: E402

PROFILES = {
    "1gbit-2ms": netsim.Profile("1gbit-2ms", rtt_ms=2, mbit=1000),
    "100mbit-20ms": netsim.Profile("100mbit-20ms", rtt_ms=20, mbit=100),
}
MODES = ["eager", "eager-warm", "nixfs-cold", "nixfs-prefetch", "nixfs-warm", "nixfs-hot"]
TICKS = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"== {datetime.datetime.now().strftime('%H:%M:%S')}  {msg}", flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def meminfo_cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached: in /proc/meminfo")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_bytes(paths) -> int:
    """Page-cache bytes of the files under `paths` (fincore)."""
    files = subprocess.run(["find", *paths, "-type", "f"], capture_output=True, text=True, check=True).stdout.split("\n")
    files = [f for f in files if f]
    total = 0
    for i in range(0, len(files), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files[i:i + 500]],
                             capture_output=True, text=True).stdout
        total += sum(int(x) for x in out.split())
    return total


class Pod:
    """A container's view of the world, reduced to what matters here: a private mount namespace
    in which /nix (CSI target) or /nix/store (eager store) is bound, then the program."""

    def __init__(self, bind_source: str, bind_target: str, app: str):
        script = f"mount --bind {bind_source} {bind_target} && exec {app}/bin/app"
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, expect: str) -> str:
        out, err = self.proc.communicate(timeout=600)
        if self.proc.returncode != 0 or expect not in out:
            raise RuntimeError(f"the program failed (exit {self.proc.returncode}): {out.strip()} {err.strip()}")
        return out


class CSI:
    """NodePublishVolume/NodeUnpublishVolume over the plugin's Unix socket, as kubelet calls them."""

    def __init__(self, stubs: str, socket: str):
        sys.path.insert(0, stubs)
        import grpc
        import csi_pb2
        import csi_pb2_grpc
        self.pb = csi_pb2
        self.channel = grpc.insecure_channel("unix://" + socket)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30, wait_for_ready=True)

    def publish(self, volume: str, path: str, target: str) -> None:
        pb = self.pb
        cap = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(),
            access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume, target_path=target, volume_capability=cap, readonly=True,
            volume_context={"x86_64-linux": path, "csi.storage.k8s.io/ephemeral": "true"}), timeout=600)

    def unpublish(self, volume: str, target: str) -> None:
        self.node.NodeUnpublishVolume(self.pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=target), timeout=60)

    def close(self) -> None:
        self.channel.close()


class Node:
    """One node's nixfs: the mount daemon and the CSI plugin on a state directory."""

    def __init__(self, h: "Harness", state: str, substituters=None, keys=None, name: str = "", csi: bool = True,
                 extra=()):
        self.h, self.state = h, state
        self.mnt = os.path.join(h.work, "mnt" + name)
        self.sock = os.path.join(h.work, f"csi{name}.sock")
        os.makedirs(self.mnt, exist_ok=True)
        logf = open(os.path.join(h.work, "daemons.log"), "a")
        common = ["--state-dir", state]
        caches = [a for url in (substituters or [h.cache.url]) for a in ("--substituter", url)]
        trusted = [a for k in (keys or [h.fx["public_key"]]) for a in ("--trusted-public-key", k)]
        # NIXFS_BENCH_MOUNT_ARGS: extra `nixfs mount` flags for an experiment (say so in the report).
        extra = [*extra, *shlex.split(os.environ.get("NIXFS_BENCH_MOUNT_ARGS", ""))]
        self.mount = subprocess.Popen(
            [h.nixfs, "mount", *common, *caches, *trusted, *extra, "--log-level", "warning", self.mnt], stdout=logf,
            stderr=logf)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.mount.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nixfs mount did not come up (see {h.work}/daemons.log)")
            time.sleep(0.02)
        self.csi_proc = None
        if not csi:
            return
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.csi_proc = subprocess.Popen(
            [h.nixfs, "csi", *common, "--endpoint", "unix://" + self.sock, "--node-id", "bench", "--log-level", "warning"],
            stdout=logf, stderr=logf)
        while not os.path.exists(self.sock):
            if self.csi_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nixfs csi did not come up (see {h.work}/daemons.log)")
            time.sleep(0.02)
        self.csi = CSI(h.stubs, self.sock)

    def procs(self) -> list:
        return [p for p in (self.csi_proc, self.mount) if p]

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs())

    def rss(self) -> int:
        return sum(proc_hwm(p.pid) for p in self.procs())

    def settle(self, seconds: float = 60) -> None:
        """Waits until the daemon has made the backing files its pods' first opens asked for
        (FUSE passthrough makes them in the background)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out = subprocess.run([self.h.nixfs, "status", "--state-dir", self.state], capture_output=True, text=True).stdout
            line = next((l for l in out.splitlines() if l.startswith("passthrough:")), "")
            if not line.startswith("passthrough: on") or " 0 being made" in line:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        if self.csi_proc:
            self.csi.close()
        for p in self.procs():
            p.send_signal(signal.SIGTERM)
        for p in self.procs():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], check=False)


class Harness:
    def __init__(self, args):
        self.args = args
        self.nixfs = os.path.realpath(args.nixfs)
        self.work = args.work
        self.results = {"runs": [], "pagecache": [], "read": {}}
        self.volume = 0
        self.node = None
        self.cache = None

    # -- set-up --
    def prepare(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        os.makedirs("/nix/store", exist_ok=True)  # the pods' mount points
        self.fx = fixtures.build(self.work, self.args.quick, log)
        # NarSize by NAR URL, to count the uncompressed bytes each run fetched.
        self.nar_sizes = {}
        cache = self.fx["cache"]
        for name in os.listdir(cache):
            if name.endswith(".narinfo"):
                fields = fixtures.narinfo_fields(os.path.join(cache, name))
                self.nar_sizes["/" + fields["URL"]] = int(fields["NarSize"])
        self.stubs = os.path.join(self.work, "stubs")
        os.makedirs(self.stubs, exist_ok=True)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(REPO, "spec", "csi"),
                        "--python_out", self.stubs, "--grpc_python_out", self.stubs, "csi.proto"], check=True)

    def fresh(self, name: str) -> str:
        d = os.path.join(self.work, name)
        if os.path.exists(d):
            subprocess.run(["chmod", "-R", "u+w", d], check=False)
            shutil.rmtree(d)
        return d

    def next_volume(self) -> tuple:
        self.volume += 1
        return f"bench-{self.volume}", os.path.join(self.work, "pods", f"pod-{self.volume}", "nix")

    # -- one measured pod start through nixfs --
    def nixfs_pod(self, wl: dict, before=None) -> dict:
        node = self.node
        volume, target = self.next_volume()
        self.cache.reset()
        cpu0 = node.cpu()
        t0 = time.monotonic()
        if before:
            before()
        t1 = time.monotonic()
        node.csi.publish(volume, wl["app"], target)
        published = time.monotonic()
        Pod(target, "/nix", wl["app"]).wait(wl["expect"])
        wall = time.monotonic() - t0
        sample = {"wall": wall, "publish": published - t1, "cpu": node.cpu() - cpu0, "rss": node.rss()}
        node.csi.unpublish(volume, target)
        return sample

    def record(self, workload, profile, mode, run, sample) -> None:
        c = self.cache.counters()
        sample.update(workload=workload, profile=profile, mode=mode, run=run, requests=c.requests,
                      narinfo_requests=c.narinfo_requests, nar_requests=c.nar_requests, wire_bytes=c.bytes,
                      connections=c.connections,
                      nar_bytes=sum(self.nar_sizes.get(u, 0) for u in c.nars))
        self.results["runs"].append(sample)
        log(f"{workload:9} {profile:12} {mode:15} run {run}: {sample['wall']:7.3f} s, "
            f"{c.bytes / 2**20:8.1f} MiB in {c.requests} requests, daemon {sample['cpu']:.2f} CPU-s, "
            f"peak RSS {sample['rss'] / 2**20:.0f} MiB")

    # -- modes --
    def eager(self, name: str, wl: dict) -> dict:
        root = self.fresh("eager-root")
        xdg = self.fresh("eager-xdg")  # Nix's own narinfo cache starts empty too
        env = dict(os.environ, **fixtures.NIX_ENV, XDG_CACHE_HOME=xdg)
        env["NIX_CONFIG"] += f"trusted-public-keys = {self.fx['public_key']}\nrequire-sigs = true\n"
        drop_caches()
        self.cache.reset()
        t0 = time.monotonic()
        errors = os.path.join(self.work, "nix-copy.log")
        with open(errors, "w") as err:
            p = subprocess.Popen(["nix", "copy", "--from", self.cache.url, "--to", root, wl["app"]], env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"nix copy failed: {open(errors).read().strip()}")
        Pod(os.path.join(root, "nix/store"), "/nix/store", wl["app"]).wait(wl["expect"])
        wall = time.monotonic() - t0
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}

    def eager_warm(self, wl: dict) -> dict:
        """The program from the store the eager mode just filled, with the page cache dropped."""
        store = os.path.join(self.work, "eager-root", "nix/store")
        drop_caches()
        self.cache.reset()
        t0 = time.monotonic()
        Pod(store, "/nix/store", wl["app"]).wait(wl["expect"])
        return {"wall": time.monotonic() - t0, "cpu": 0.0, "rss": 0}

    def nixfs_modes(self, name: str, wl: dict, profile: str, run: int) -> None:
        # cold, then warm (same state, daemons restarted), then hot (a second pod right after).
        state = self.fresh("state")
        self.node = Node(self, state)
        drop_caches()
        self.record(name, profile, "nixfs-cold", run, self.nixfs_pod(wl))
        # The state a node keeps between pods includes the backing files made after the first.
        self.node.settle()
        self.node.stop()
        self.node = Node(self, state)
        drop_caches()
        self.record(name, profile, "nixfs-warm", run, self.nixfs_pod(wl))
        self.record(name, profile, "nixfs-hot", run, self.nixfs_pod(wl))
        self.node.stop()
        # prefetch: `nixfs fetch` through the running daemon, then the pod.
        state = self.fresh("state")
        self.node = Node(self, state)
        drop_caches()

        self.record(name, profile, "nixfs-prefetch", run, self.nixfs_pod(wl, before=lambda: self.prefetch(state, wl)))
        self.node.stop()
        self.node = None

    def prefetch(self, state: str, wl: dict) -> None:
        """`nixfs fetch` of the workload's closure (through the running daemon on `state`)."""
        subprocess.run([self.nixfs, "fetch", "--state-dir", state, "--substituter", self.cache.url,
                        "--trusted-public-key", self.fx["public_key"], wl["app"]], check=True, capture_output=True)

    # -- what a perfect lazy system would move: what the program reads --
    def bytes_read(self, name: str, wl: dict) -> None:
        root = os.path.join(self.work, "eager-root")
        store = os.path.join(root, "nix/store")
        samples, hot = [], []
        for _ in range(self.args.runs):
            drop_caches()
            Pod(store, "/nix/store", wl["app"]).wait(wl["expect"])
            samples.append(resident_bytes([os.path.join(store, os.path.basename(p)) for p in wl["closure"]]))
            t0 = time.monotonic()
            Pod(store, "/nix/store", wl["app"]).wait(wl["expect"])
            hot.append(time.monotonic() - t0)
        self.results["read"][name] = {"bytes": samples, "hot_local_wall": hot}
        log(f"{name}: the program reads {statistics.median(samples) / 2**20:.1f} MiB "
            f"(page cache after a cold run on a local copy); hot on local disk {statistics.median(hot):.3f} s")

    # -- page cache for N pods on one node --
    def pagecache(self, name: str, wl: dict) -> None:
        counts = [1, 2, 4, 8]
        copies = []
        src = os.path.join(self.work, "eager-root")
        for k in range(max(counts)):
            d = self.fresh(f"copy-{k}")
            subprocess.run(["cp", "-a", src, d], check=True)
            copies.append(d)
        state = self.fresh("state")
        self.node = Node(self, state)
        self.prefetch(state, wl)
        for run in range(1, self.args.runs + 1):
            for n in counts:
                # nixfs: N pods, N volumes, one node; the daemon restarted, so that its own memory
                # cache of chunks is as empty as the page cache and every N pays the same.
                self.node.stop()
                self.node = Node(self, state)
                vols = [self.next_volume() for _ in range(n)]
                for v, t in vols:
                    self.node.csi.publish(v, wl["app"], t)
                drop_caches()
                time.sleep(0.5)
                c0 = meminfo_cached()
                pods = [Pod(t, "/nix", wl["app"]) for _, t in vols]
                for p in pods:
                    p.wait(wl["expect"])
                grown = meminfo_cached() - c0
                state_pages = resident_bytes([state])
                for v, t in vols:
                    self.node.csi.unpublish(v, t)
                self.results["pagecache"].append({"workload": name, "system": "nixfs", "n": n, "run": run,
                                                  "bytes": grown, "state_bytes": state_pages})
                # N copies of the store, one per pod.
                drop_caches()
                time.sleep(0.5)
                c0 = meminfo_cached()
                pods = [Pod(os.path.join(copies[k], "nix/store"), "/nix/store", wl["app"]) for k in range(n)]
                for p in pods:
                    p.wait(wl["expect"])
                grown = meminfo_cached() - c0
                self.results["pagecache"].append({"workload": name, "system": "copies", "n": n, "run": run,
                                                  "bytes": grown})
                log(f"{name} page cache, {n} pods, run {run}: nixfs {self.results['pagecache'][-2]['bytes'] / 2**20:.1f} MiB "
                    f"(of which state dir {state_pages / 2**20:.1f}), copies {grown / 2**20:.1f} MiB")
        self.node.stop()
        self.node = None
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)

    # -- the whole thing --
    def run(self) -> None:
        self.prepare()
        started = time.time()
        for pname in self.args.profiles:
            profile = PROFILES[pname]
            self.cache = netsim.Cache(self.fx["cache"], profile).start()
            try:
                for name in self.args.workloads:
                    wl = self.fx["workloads"][name]
                    for run in range(1, self.args.runs + 1):
                        self.record(name, pname, "eager", run, self.eager(name, wl))
                        self.record(name, pname, "eager-warm", run, self.eager_warm(wl))
                        self.nixfs_modes(name, wl, pname, run)
                    if pname == self.args.profiles[0]:
                        self.bytes_read(name, wl)
                        if not self.args.skip_pagecache:
                            self.pagecache(name, wl)
            finally:
                self.cache.stop()
        self.results["seconds"] = time.time() - started

    def cleanup(self) -> None:
        if self.node:
            try:
                self.node.stop()
            except Exception as e:  # keep cleaning
                print(f"cleanup: {e}", file=sys.stderr)
        mounts = [line.split()[1] for line in open("/proc/mounts") if line.split()[1].startswith(self.work)]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)


def machine(nixfs: str) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "os": out(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]), "nix": out(["nix", "--version"]),
            "nixfs": out([nixfs, "--version"]), "git": out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nixfs", default=os.path.join(REPO, ".build/release/nixfs"))
    ap.add_argument("--work", default="/var/tmp/nixfs-coldstart", help="fixtures and scratch (kept for reuse)")
    ap.add_argument("--out", default=os.path.join(REPO, "Documentation"), help="where benchmarks.md goes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smaller toolchain path; for bench-quick")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--workloads", nargs="+", default=["python", "toolchain", "wide"], choices=["python", "toolchain", "wide"])
    ap.add_argument("--skip-pagecache", action="store_true")
    ap.add_argument("--command", default="", help="the command line to print in the report")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("coldstart: run as root (drop_caches, FUSE and bind mounts, mount namespaces)")
    if not os.access(args.nixfs, os.X_OK):
        sys.exit(f"coldstart: no nixfs binary at {args.nixfs} (make release)")
    args.work = os.path.realpath(args.work)
    h = Harness(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        h.run()
    finally:
        h.cleanup()
    results = h.results
    results["machine"] = machine(h.nixfs)
    results["command"] = args.command or " ".join(["python3", "bench/coldstart/harness.py"] + sys.argv[1:])
    results["config"] = {"runs": args.runs, "quick": args.quick, "profiles": {p: vars(PROFILES[p]) for p in args.profiles},
                         "workloads": {w: {k: v for k, v in h.fx["workloads"][w].items() if k != "closure"}
                                       for w in args.workloads}}
    os.makedirs(os.path.join(args.out, "benchmarks"), exist_ok=True)
    path = os.path.join(args.out, "benchmarks", "coldstart.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"results: {path}")
    import report
    report.write(results, args.out)


if __name__ == "__main__":
    main()
