#!/usr/bin/env python3
"""Turns bench/fs-bench.sh's raw timings into a JSON result file and a Markdown table.

usage: report.py WORKDIR OUT.json OUT.md
WORKDIR holds raw.tsv (group, system, run, t0, t1, bytes, extra) and meta.env (key=value lines).
Throughput is in MB/s with MB = 10^6 bytes; times in seconds or milliseconds as labelled.
"""
import json, statistics, sys

work, out_json, out_md = sys.argv[1:4]
meta = {}
for line in open(f"{work}/meta.env"):
    if "=" in line:
        k, v = line.rstrip("\n").split("=", 1)
        meta[k] = v

SYSTEMS = ["disk", "nixfs", "nixfs-nopt", "squashfuse"]
NAMES = {"disk": "local disk (ext4)", "nixfs": "nixfs (passthrough)", "nixfs-nopt": "nixfs --passthrough off",
         "squashfuse": "squashfuse"}
GROUPS = [  # group, label, kind
    ("read-warm", "sequential read of the {big} file, warm (page cache)", "rate"),
    ("read-cold", "sequential read of the {big} file, cold (page cache dropped; daemons running)", "rate"),
    ("mmap-cold", "random 4 KiB page faults through mmap of the {big} file, cold (page cache dropped)", "rate"),
    ("read-restart", "sequential read of the {big} file, cold + FUSE daemon restarted", "rate"),
    ("meta-warm", "`find -printf '%s %i'` over {files} files, warm", "time"),
    ("meta-cold", "`find -printf '%s %i'` over {files} files, cold (page cache dropped)", "time"),
    ("meta-restart", "`find -printf '%s %i'` over {files} files, cold + FUSE daemon restarted", "time"),
    ("ttfb-cold", "first byte of one small file, cold (`head -c1`, incl. process start)", "ms"),
]

raw = {}
for line in open(f"{work}/raw.tsv"):
    g, s, run, t0, t1, nbytes, extra = line.rstrip("\n").split("\t")
    raw.setdefault(g, {}).setdefault(s, []).append(
        {"run": int(run), "seconds": float(t1) - float(t0), "bytes": int(nbytes), "extra": extra})

results = {}
for g, label, kind in GROUPS:
    if g not in raw:
        continue
    results[g] = {}
    for s, runs in raw[g].items():
        secs = [r["seconds"] for r in runs]
        med, lo, hi = statistics.median(secs), min(secs), max(secs)
        entry = {"runs_seconds": [round(x, 6) for x in secs], "median_seconds": med, "min_seconds": lo, "max_seconds": hi}
        if kind == "rate":
            b = runs[0]["bytes"]
            entry.update(unit="MB/s", median=b / med / 1e6, min=b / hi / 1e6, max=b / lo / 1e6)
        elif kind == "ms":
            entry.update(unit="ms", median=med * 1e3, min=lo * 1e3, max=hi * 1e3)
        else:
            entry.update(unit="s", median=med, min=lo, max=hi)
        extras = [r["extra"] for r in runs if r["extra"] != "-"]
        if extras:
            entry["fuse_requests_per_run"] = [json.loads(e) for e in extras]
        results[g][s] = entry

first = {s: runs[0]["seconds"] for s, runs in raw.get("first-access", {}).items()}


def med(g, s):
    return results.get(g, {}).get(s, {}).get("median")


targets = []
def target(name, rule, ok, nix, ref):
    targets.append({"target": name, "rule": rule, "nixfs": nix, "reference": ref,
                    "met": None if ok is None else bool(ok)})

d, n, q = med("read-warm", "disk"), med("read-warm", "nixfs"), med("read-warm", "squashfuse")
target("warm reads within 10% of the local disk", "nixfs MB/s >= 0.9 x local disk MB/s (medians)",
       None if None in (d, n) else n >= 0.9 * d, n, d)
n, q = med("read-cold", "nixfs"), med("read-cold", "squashfuse")
target("cold reads at least as fast as squashfuse", "nixfs MB/s >= squashfuse MB/s (medians, page cache dropped)",
       None if None in (n, q) else n >= q, n, q)
n, q = med("meta-cold", "nixfs"), med("meta-cold", "squashfuse")
target("cold metadata at least as fast as squashfuse", "nixfs seconds <= squashfuse seconds (medians, page cache dropped)",
       None if None in (n, q) else n <= q, n, q)

# Wave 3 (issue 29): native speed once bytes are local, against the local disk in the same run.
d, n = med("read-cold", "disk"), med("read-cold", "nixfs")
target("cold sequential read at least 1.0x ext4", "nixfs MB/s >= local disk MB/s (medians, page cache dropped)",
       None if None in (d, n) else n >= d, n, d)
d, n = med("mmap-cold", "disk"), med("mmap-cold", "nixfs")
target("cold random 4 KiB mmap faults at least 0.9x ext4", "nixfs MB/s >= 0.9 x local disk MB/s (medians)",
       None if None in (d, n) else n >= 0.9 * d, n, d)
d, n = med("meta-cold", "disk"), med("meta-cold", "nixfs")
target("cold find at most 1.5x ext4", "nixfs seconds <= 1.5 x local disk seconds (medians)",
       None if None in (d, n) else n <= 1.5 * d, n, d)


def cpu(g, s):
    runs = results.get(g, {}).get(s, {}).get("fuse_requests_per_run") or []
    ticks = [r.get("cpu_ticks", 0) for r in runs]
    return statistics.median(ticks) / 100 if ticks else None


daemon_cpu = {s: {g: cpu(g, s) for g in ("read-cold", "mmap-cold")} for s in ("nixfs", "nixfs-nopt")}

doc = {"meta": meta, "daemon_cpu_seconds": daemon_cpu, "first_access_seconds": first, "results": results, "targets": targets}
json.dump(doc, open(out_json, "w"), indent=2)


def cell(g, s, kind):
    e = results.get(g, {}).get(s)
    if not e:
        return "—"
    fmt = {"rate": "{:.0f}", "time": "{:.2f}", "ms": "{:.1f}"}[kind]
    unit = {"rate": " MB/s", "time": " s", "ms": " ms"}[kind]
    return f"{fmt.format(e['median'])}{unit} ({fmt.format(e['min'])}–{fmt.format(e['max'])})"


big = f"{int(meta.get('BIG_MB', 0))} MiB"
files = f"{int(meta.get('SMALL_FILES', 0)):,}"
lines = []
lines.append(f"Build: **{meta.get('BUILD_LABEL', '?')}** (`{meta.get('NIXFS', '?')}`). "
             f"Machine: {meta.get('CPU', '?')}, {meta.get('NPROC', '?')} cores, {meta.get('MEM', '?')}, "
             f"kernel {meta.get('KERNEL', '?')}. Load average (1/5/15 min) at start: {meta.get('LOAD_START', '?')}; "
             f"at end: {meta.get('LOAD_END', '?')}. {meta.get('RUNS', '?')} runs each, interleaved across the four; "
             f"median (min–max). MB = 10^6 bytes.")
lines.append("")
lines.append("| measurement | " + " | ".join(NAMES[s] for s in SYSTEMS) + " |")
lines.append("| --- | " + " | ".join("---" for _ in SYSTEMS) + " |")
for g, label, kind in GROUPS:
    if g in results:
        lines.append(f"| {label.format(big=big, files=files)} | " + " | ".join(cell(g, s, kind) for s in SYSTEMS) + " |")
lines.append("")
if first:
    lines.append("First access through nixfs (narinfo + NAR from the cache server on 127.0.0.1, verify, chunk, "
                 "compress, index; then read everything once): " +
                 "; ".join(f"{k} {v:.1f} s" for k, v in sorted(first.items())) + ".")
    lines.append("")
def seconds(x):
    return "—" if x is None else f"{x:.2f} s"


lines.append("Daemon CPU (user + system, median per run, from /proc/PID/stat): " + "; ".join(
    f"{NAMES[s]}: cold read {seconds(v['read-cold'])}, mmap faults {seconds(v['mmap-cold'])}"
    for s, v in daemon_cpu.items()) + f". Passthrough: {meta.get('PASSTHROUGH', '?')}.")
lines.append("")
lines.append("| target | rule | nixfs | reference | met |")
lines.append("| --- | --- | --- | --- | --- |")
for t in targets:
    fmt = (lambda x: "—" if x is None else (f"{x:.2f} s" if "seconds" in t["rule"] else f"{x:.0f} MB/s"))
    met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
    lines.append(f"| {t['target']} | {t['rule']} | {fmt(t['nixfs'])} | {fmt(t['reference'])} | {met} |")
open(out_md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
