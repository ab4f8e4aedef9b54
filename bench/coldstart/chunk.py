#!/usr/bin/env python3
"""Chunk-lazy cold starts: nodes behind an in-cluster `nixfs serve` that fetch only the chunks a
program reads (see Documentation/benchmarks-chunk.md). `make bench-chunk`.

The far upstream is the harness's simulated cache (100 Mbit/s, 20 ms; or 1 Gbit/s, 2 ms). The serve
runs in its own network namespace, reached over a veth pair paced at 10 Gbit/s on both ends (tbf):
the in-cluster link, shared by every node as they share the serve's card. Its 0.2 ms round trip is
not added (the kernel here has no netem); the veth's own is tens of microseconds.
Nodes list the serve first and the upstream after it, and trust both keys, as deploy/ sets them up.

Modes, each from an empty node and a dropped page cache, side by side in one run:
  eager              `nix copy --from UPSTREAM`, then run (the anchor: what nix-csi does)
  nixfs-cold         nixfs straight from the upstream, whole NARs (today's nixfs)
  nixfs-chunk        through the serve, which already holds the closure
  nixfs-chunk-profiled  the same, once the serve has the path's startup profile (learned from the
                     nixfs-chunk pod just before): the node prefetches it at publish
  nixfs-chunk-first  through a serve that is cold too (it pulls each path once, then indexes it)
  nixfs-chunk-warm   the floor of the others: the profiled node restarted, with the chunks the program
                     reads all local, page cache dropped (what nixfs-warm is in benchmarks.md)
and N = 1, 2, 4, 8 nodes (separate mounts and state dirs) starting the same closure
at once through one cold serve: upstream egress and per-node start time."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fixtures  # noqa: E402
import harness  # noqa: E402
import netsim  # noqa: E402
from harness import Pod, drop_caches, log  # noqa: E402

CLUSTER = netsim.Profile("cluster-10gbit", rtt_ms=0.2, mbit=10000)
MODES = ["eager", "nixfs-cold", "nixfs-chunk", "nixfs-chunk-profiled", "nixfs-chunk-first", "nixfs-chunk-warm"]
PROFILE_SECONDS = 5


class ClusterNet:
    """The in-cluster network: the serve runs in its own network namespace ("a host"), reached
    over a veth pair whose two ends each delay by half the round trip and pace at the link rate
    (netem). Every node shares that link, as they share the serve's network card."""

    NS, NODE_IF, SERVE_IF = "nixfs-bench-serve", "nxb-node", "nxb-serve"
    NODE_IP, SERVE_IP = "10.231.0.1", "10.231.0.2"

    def __init__(self, profile: netsim.Profile):
        self.profile = profile

    def sh(self, *cmd, check=True):
        return subprocess.run(list(cmd), check=check, capture_output=True, text=True)

    def up(self) -> "ClusterNet":
        self.down()
        self.sh("ip", "netns", "add", self.NS)
        self.sh("ip", "link", "add", self.NODE_IF, "type", "veth", "peer", "name", self.SERVE_IF)
        self.sh("ip", "link", "set", self.SERVE_IF, "netns", self.NS)
        self.sh("ip", "addr", "add", self.NODE_IP + "/24", "dev", self.NODE_IF)
        self.sh("ip", "link", "set", self.NODE_IF, "up")
        ns = ["ip", "netns", "exec", self.NS]
        self.sh(*ns, "ip", "addr", "add", self.SERVE_IP + "/24", "dev", self.SERVE_IF)
        self.sh(*ns, "ip", "link", "set", self.SERVE_IF, "up")
        self.sh(*ns, "ip", "link", "set", "lo", "up")
        # The link's rate with tbf. Its delay would need netem, which this machine's kernel lacks: the
        # veth's own round trip (tens of microseconds) stands for the 0.2 ms (see the report).
        rate = f"{self.profile.mbit:.0f}mbit"
        for prefix, dev in (([], self.NODE_IF), (ns, self.SERVE_IF)):
            self.sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "4mb", "latency", "5ms")
        return self

    def down(self) -> None:
        self.sh("ip", "link", "del", self.NODE_IF, check=False)
        self.sh("ip", "netns", "del", self.NS, check=False)

    def received(self) -> int:
        """Bytes the nodes' side of the link has received (from the serve)."""
        with open(f"/sys/class/net/{self.NODE_IF}/statistics/rx_bytes") as f:
            return int(f.read())


class Serve:
    """`nixfs serve` in front of the (far) upstream, signing chunk indexes with its own key."""

    def __init__(self, h, state: str, key_file: str):
        self.state = state
        logf = open(os.path.join(h.work, "serve.log"), "a")
        upstream = f"http://{ClusterNet.NODE_IP}:{h.cache.port}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ClusterNet.NS, h.nixfs, "serve", "--state-dir", state, "--listen",
             f"{ClusterNet.SERVE_IP}:0", "--substituter", upstream,
             "--trusted-public-key", h.fx["public_key"], "--secret-key-file", key_file, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=logf, text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"nixfs serve did not start (see {h.work}/serve.log)")
        self.url = line[line.index("http://"):].strip()

    def warm(self, closure) -> None:
        for p in closure:
            urllib.request.urlopen(f"{self.url}/{os.path.basename(p)[:32]}.narinfo", timeout=600).read()

    def wait_profile(self, app: str, seconds: float) -> bool:
        url = f"{self.url}/nixfs/v1/profiles/{os.path.basename(app)[:32]}"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=10).read()
                return True
            except Exception:
                time.sleep(0.2)
        return False

    def requests(self) -> int:
        """Chunk and index round trips answered so far: single chunks, batches (many chunks in
        one), indexes."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=30).read().decode()
        v = {}
        for line in text.splitlines():
            if line.startswith("nixfs_serve_") and " " in line and not line.startswith("#"):
                name, value = line.split()[0], line.split()[-1]
                v[name] = int(float(value))
        return (v.get("nixfs_serve_chunks_served_total", 0) - v.get("nixfs_serve_batched_chunks_served_total", 0)
                + v.get("nixfs_serve_chunk_batches_served_total", 0) + v.get("nixfs_serve_manifests_served_total", 0))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ChunkBench:
    def __init__(self, args):
        self.h = harness.Harness(args)
        self.args = args
        self.results = {"runs": [], "nodes": [], "read": {}}

    def serve_key(self) -> tuple:
        sk, pk = os.path.join(self.h.work, "serve.sk"), os.path.join(self.h.work, "serve.pk")
        if not os.path.exists(sk):
            fixtures.nix(["nix-store", "--generate-binary-cache-key", "nixfs-serve-bench-1", sk, pk])
        return sk, open(pk).read().strip()

    def chunk_bytes(self, state: str) -> int:
        """Uncompressed bytes of the chunks a node holds (all fetched: its state started empty)."""
        out = subprocess.run([self.h.nixfs, "stats", "--state-dir", state, "--json"], capture_output=True, text=True)
        return json.loads(out.stdout).get("chunkBytes", 0) if out.returncode == 0 else -1

    def record(self, workload, profile, mode, run, sample, proxy_bytes=None, fetched=None) -> None:
        c = self.h.cache.counters()
        sample.update(workload=workload, profile=profile, mode=mode, run=run, upstream_bytes=c.bytes,
                      upstream_nar_requests=c.nar_requests)
        if proxy_bytes is not None:
            sample["cluster_bytes"] = proxy_bytes
        if fetched is not None:
            sample["fetched_bytes"] = fetched
        self.results["runs"].append(sample)
        log(f"{workload:9} {profile:12} {mode:17} run {run}: {sample['wall']:7.3f} s, upstream "
            f"{c.bytes / 2**20:7.1f} MiB" + (f", in-cluster {proxy_bytes / 2**20:7.1f} MiB" if proxy_bytes is not None else "")
            + (f", node fetched {fetched / 2**20:7.1f} MiB" if fetched is not None else ""))

    def chunk_modes(self, name, wl, profile, run, warm: bool, sk: str, pk: str) -> None:
        """nixfs-chunk (then nixfs-chunk-profiled, on the same serve, once the first pod's startup
        profile is there) with a warm serve; nixfs-chunk-first with a cold one."""
        h = self.h
        serve = Serve(h, h.fresh("serve-state"), sk)
        try:
            if warm:
                serve.warm(wl["closure"])
            modes = ["nixfs-chunk", "nixfs-chunk-profiled"] if warm else ["nixfs-chunk-first"]
            for mode in modes:
                if mode == "nixfs-chunk-profiled" and not serve.wait_profile(wl["app"], 30):
                    log(f"{name}: no startup profile reached the serve: skipping {mode}")
                    continue
                state = h.fresh("state")
                h.node = harness.Node(h, state, substituters=[serve.url, h.cache.url], keys=[h.fx["public_key"], pk],
                                      extra=["--startup-profile-seconds", str(PROFILE_SECONDS)])
                drop_caches()
                requests0 = serve.requests()
                before = self.net.received()
                sample = h.nixfs_pod(wl)
                time.sleep(0.3)  # chunks arriving are written off the read path
                sample["serve_requests"] = serve.requests() - requests0
                self.record(name, profile, mode, run, sample, proxy_bytes=self.net.received() - before,
                            fetched=self.chunk_bytes(state))
                if mode == "nixfs-chunk":
                    time.sleep(PROFILE_SECONDS)  # the profile is reported when the window closes
                h.node.stop()
                h.node = None
                if mode == "nixfs-chunk-profiled":
                    # The floor: the same node restarted, every chunk the program reads now local.
                    h.node = harness.Node(h, state, substituters=[serve.url, h.cache.url], keys=[h.fx["public_key"], pk])
                    drop_caches()
                    requests0 = serve.requests()
                    sample = h.nixfs_pod(wl)
                    sample["serve_requests"] = serve.requests() - requests0
                    self.record(name, profile, "nixfs-chunk-warm", run, sample)
                    h.node.stop()
                    h.node = None
        finally:
            if h.node:
                h.node.stop()
                h.node = None
            serve.stop()

    def nodes(self, name, wl, profile, sk, pk) -> None:
        """N nodes at once through one cold serve; pods bind each node's mount at /nix/store."""
        h = self.h
        for n in (1, 2, 4, 8):
            for run in range(1, self.args.runs + 1):
                serve = Serve(h, h.fresh("serve-state"), sk)
                nodes = []
                try:
                    for k in range(n):
                        nodes.append(harness.Node(h, h.fresh(f"state-{k}"), substituters=[serve.url, h.cache.url],
                                                  keys=[h.fx["public_key"], pk], name=f"-{k}", csi=False))
                    drop_caches()
                    h.cache.reset()
                    t0 = time.monotonic()
                    pods = [Pod(node.mnt, "/nix/store", wl["app"]) for node in nodes]
                    walls = [0.0] * n
                    errors = []

                    def wait(k):
                        try:
                            pods[k].wait(wl["expect"])
                        except Exception as e:  # reported below, after every pod ended
                            errors.append(e)
                        walls[k] = time.monotonic() - t0

                    waiters = [threading.Thread(target=wait, args=(k,)) for k in range(n)]
                    for w in waiters:
                        w.start()
                    for w in waiters:
                        w.join()
                    if errors:
                        raise errors[0]
                    c = h.cache.counters()
                    self.results["nodes"].append({"workload": name, "profile": profile, "n": n, "run": run,
                                                  "walls": walls, "upstream_bytes": c.bytes,
                                                  "upstream_nar_requests": c.nar_requests})
                    log(f"{name:9} {profile:12} {n} nodes run {run}: slowest {max(walls):.3f} s, median "
                        f"{statistics.median(walls):.3f} s, upstream {c.bytes / 2**20:.1f} MiB in {c.nar_requests} NARs")
                finally:
                    for node in nodes:
                        node.stop()
                    serve.stop()

    def run(self) -> None:
        h = self.h
        h.prepare()
        sk, pk = self.serve_key()
        self.net = ClusterNet(CLUSTER).up()
        started = time.time()
        for pname in self.args.profiles:
            h.cache = netsim.Cache(h.fx["cache"], harness.PROFILES[pname], listen="0.0.0.0").start()
            try:
                for name in self.args.workloads:
                    wl = h.fx["workloads"][name]
                    for run in range(1, self.args.runs + 1):
                        self.record(name, pname, "eager", run, h.eager(name, wl))
                        state = h.fresh("state")
                        h.node = harness.Node(h, state)
                        drop_caches()
                        self.record(name, pname, "nixfs-cold", run, h.nixfs_pod(wl))
                        h.node.stop()
                        h.node = None
                        self.chunk_modes(name, wl, pname, run, True, sk, pk)
                        self.chunk_modes(name, wl, pname, run, False, sk, pk)
                    if name not in self.results["read"]:
                        h.bytes_read(name, wl)
                        self.results["read"][name] = h.results["read"][name]
                    if pname == self.args.profiles[0] and not self.args.skip_nodes:
                        self.nodes(name, wl, pname, sk, pk)
            finally:
                h.cache.stop()
        self.results["seconds"] = time.time() - started


def bound(results, workload, profile: dict, compressed_per_nar: float) -> float:
    read = results["read"][workload]
    nbytes = statistics.median(read["bytes"])
    return statistics.median(read["hot_local_wall"]) + profile["rtt_ms"] / 1000 + nbytes * compressed_per_nar / (
        profile["mbit"] * 1e6 / 8)


def markdown(results) -> str:
    cfg = results["config"]
    runs = results["runs"]
    med = statistics.median
    out = ["# Benchmarks: chunk-lazy nodes behind `nixfs serve`", "",
           "_Generated by `bench/coldstart/chunk.py` from a real run (`make bench-chunk`); do not edit by hand. "
           "Method: the script's docstring and [benchmarks-method.md](benchmarks-method.md)._", "",
           f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['kernel']}; "
           f"commit {results['machine']['git']}; {results['machine']['date']}. Every figure is the median of "
           f"{cfg['runs']} runs (min–max). This run took {results['seconds'] / 60:.1f} minutes.", "",
           "In-cluster link node ↔ serve: a veth pair into the serve's network namespace paced at 10 Gbit/s "
           "(tbf). The 0.2 ms round trip is not emulated: this kernel has no netem, so the veth's own round trip "
           "(tens of µs) stands for it, and each chunk request that waits alone is up to 0.15 ms too fast. The "
           "serve, the nodes and the programs share the 2 cores. Bound: the harness's perfect-lazy bound (warm local run + one round "
           "trip + bytes the program reads × compression / bandwidth) for the link the node fetches over: in-cluster "
           "for `nixfs-chunk`, upstream for `nixfs-chunk-first`, `nixfs-cold` and eager.", ""]
    out += ["| workload | upstream | mode | wall time | bound | wall / bound | upstream bytes | in-cluster bytes | "
            "chunk + index round trips | node fetched (uncompressed) / program reads |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for profile in cfg["profiles"]:
        for w in cfg["workloads"]:
            wl = cfg["workloads"][w]
            ratio = wl["download_bytes"] / wl["nar_bytes"]
            read = med(results["read"][w]["bytes"])
            for mode in MODES:
                rs = [r for r in runs if r["workload"] == w and r["profile"] == profile and r["mode"] == mode]
                if not rs:
                    continue
                walls = [r["wall"] for r in rs]
                link = ({"rtt_ms": CLUSTER.rtt_ms, "mbit": CLUSTER.mbit}
                        if mode in ("nixfs-chunk", "nixfs-chunk-profiled", "nixfs-chunk-warm")
                        else cfg["profiles"][profile])
                b = bound(results, w, link, ratio)
                fetched = med([r["fetched_bytes"] for r in rs]) if "fetched_bytes" in rs[0] else None
                cl = med([r["cluster_bytes"] for r in rs]) if "cluster_bytes" in rs[0] else None
                out.append(
                    f"| {w} | {profile} | {mode} | {med(walls):.2f} s ({min(walls):.2f}–{max(walls):.2f}) | {b:.2f} s | "
                    f"{med(walls) / b:.2f}x | {med([r['upstream_bytes'] for r in rs]) / 2**20:.1f} MiB | "
                    + (f"{cl / 2**20:.1f} MiB" if cl is not None else "–") + " | "
                    + (f"{med([r['serve_requests'] for r in rs]):.0f}" if "serve_requests" in rs[0] else "–") + " | "
                    + (f"{fetched / 2**20:.1f} / {read / 2**20:.1f} MiB = {fetched / read:.2f}" if fetched else "–") + " |")
    if results["nodes"]:
        out += ["", "## N nodes starting the same closure at once through one cold serve", "",
                "Upstream egress against one closure's compressed NARs, and the slowest node's start against one "
                "node's (medians over runs).", "",
                "| workload | nodes | slowest start | median start | slowest / one node's | upstream egress | "
                "egress / one closure |", "|---|---:|---:|---:|---:|---:|---:|"]
        for w in cfg["workloads"]:
            one = [max(r["walls"]) for r in results["nodes"] if r["workload"] == w and r["n"] == 1]
            if not one:
                continue
            for n in (1, 2, 4, 8):
                rs = [r for r in results["nodes"] if r["workload"] == w and r["n"] == n]
                if not rs:
                    continue
                slow = med([max(r["walls"]) for r in rs])
                mid = med([med(r["walls"]) for r in rs])
                egress = med([r["upstream_bytes"] for r in rs])
                closure = cfg["workloads"][w]["download_bytes"]
                out.append(f"| {w} | {n} | {slow:.2f} s | {mid:.2f} s | {slow / med(one):.2f}x | "
                           f"{egress / 2**20:.1f} MiB | {egress / closure:.2f}x |")
    return "\n".join(out) + "\n"


def plot(results, out_dir) -> str:
    """One bar chart: wall time per workload, upstream and mode, with each one's bound."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    cfg = results["config"]
    groups = [(w, p) for p in cfg["profiles"] for w in cfg["workloads"]]
    fig, ax = plt.subplots(figsize=(10, 4.4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        meds = []
        for w, p in groups:
            walls = [r["wall"] for r in results["runs"] if r["workload"] == w and r["profile"] == p and r["mode"] == mode]
            meds.append(statistics.median(walls) if walls else 0)
        ax.bar([k + (i - len(MODES) / 2 + 0.5) * width for k in range(len(groups))], meds, width, label=mode)
    ax.set_xticks(range(len(groups)), [f"{w}\n{p}" for w, p in groups])
    ax.set_yscale("log")
    ax.set_ylabel("seconds until the program has finished")
    ax.set_title("Cold start through nixfs serve (median of runs)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    name = "chunk.png"
    fig.savefig(os.path.join(out_dir, "benchmarks", name), dpi=110)
    plt.close(fig)
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nixfs", default=os.path.join(harness.REPO, ".build/release/nixfs"))
    ap.add_argument("--work", default="/var/tmp/nixfs-coldstart")
    ap.add_argument("--out", default=os.path.join(harness.REPO, "Documentation"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profiles", nargs="+", default=["100mbit-20ms", "1gbit-2ms"], choices=list(harness.PROFILES))
    ap.add_argument("--workloads", nargs="+", default=["python", "toolchain"], choices=["python", "toolchain", "wide"])
    ap.add_argument("--skip-nodes", action="store_true")
    args = ap.parse_args()
    args.skip_pagecache = True
    if os.geteuid() != 0:
        sys.exit("chunk bench: run as root")
    args.work = os.path.realpath(args.work)
    b = ChunkBench(args)
    try:
        b.run()
    finally:
        b.h.cleanup()
        ClusterNet(CLUSTER).down()
    r = b.results
    r["machine"] = harness.machine(b.h.nixfs)
    r["config"] = {"runs": args.runs, "profiles": {p: vars(harness.PROFILES[p]) for p in args.profiles},
                   "workloads": {w: {k: v for k, v in b.h.fx["workloads"][w].items() if k != "closure"}
                                 for w in args.workloads}}
    os.makedirs(os.path.join(args.out, "benchmarks"), exist_ok=True)
    with open(os.path.join(args.out, "benchmarks", "chunk.json"), "w") as f:
        json.dump(r, f, indent=1)
    image = plot(r, args.out)
    text = markdown(r)
    if image:
        text = text.replace("\n| workload | upstream |", f"\n![cold start through nixfs serve](benchmarks/{image})\n\n| workload | upstream |", 1)
    with open(os.path.join(args.out, "benchmarks-chunk.md"), "w") as f:
        f.write(text)
    log(f"results: {args.out}/benchmarks-chunk.md")


if __name__ == "__main__":
    main()
