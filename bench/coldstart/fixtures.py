"""Workloads built with real Nix from real software on this machine, signed, and copied into one
file:// binary cache (the directory the simulated cache serves).

  python     CPython 3.11 (Debian's interpreter and its whole standard library, byte-compiled) as a
             store path; the program imports a few dozen stdlib modules: many small files.
  toolchain  LLVM's clang and lld from the Swift toolchain as one store path of hundreds of MiB; the
             program runs `clang --version`: a large tree of which little is read.
  wide       60 library paths built by nix-build (each refers to the next), one program that refers
             to all of them and reads from three: a wide closure of which a few paths are touched.

Every program is a busybox `sh` script in its own store path, so each closure also holds busybox."""

import json
import os
import shutil
import subprocess

# The project's Nix settings (scripts/nix/nix.conf) and none of the machine's: no build users, no
# sandbox, no substituters, whatever /etc/nix, ~/.config/nix or the caller's NIX_CONFIG say.
NIX_ENV = {
    "NIX_CONF_DIR": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "nix"),
    "NIX_USER_CONF_FILES": "",
    "NIX_CONFIG": "",
    "NIX_REMOTE": "",
}

PYTHON_IMPORTS = (
    "argparse asyncio base64 collections concurrent.futures csv dataclasses datetime decimal email.parser "
    "enum fractions functools gzip hashlib http.client http.server inspect ipaddress json logging "
    "logging.handlers multiprocessing pathlib pickle pprint random re shutil socket sqlite3 ssl "
    "statistics string subprocess tarfile tempfile textwrap threading tomllib typing unittest "
    "urllib.request uuid xml.dom.minidom xml.etree.ElementTree zipfile"
).split()

WIDE_PATHS = 60


def nix(args, **kw):
    """Runs a Nix command; a failure stops the harness with what Nix said (its error: lines)."""
    env = dict(os.environ, **NIX_ENV)
    p = subprocess.run(args, env=env, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        lines = p.stderr.splitlines()
        errors = next((lines[i:] for i, line in enumerate(lines) if line.startswith("error:")), lines[-20:])
        raise SystemExit(f"fixtures: {' '.join(args[:2])} exited {p.returncode}:\n" + "\n".join(errors[:40]))
    return p.stdout.strip()


def narinfo_fields(path: str) -> dict:
    """A narinfo file's `Key: value` lines."""
    with open(path) as f:
        return dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)


def _python_tree(dest: str) -> None:
    """bin/python3.11 and lib/python3.11 (Python finds its prefix from the landmark lib/python3.11/os.py)."""
    src_bin = shutil.which("python3.11", path="/usr/bin")
    if not src_bin or not os.path.isfile("/usr/lib/python3.11/os.py"):
        raise SystemExit("fixture python: Debian's python3.11 is missing (apt-get install python3.11)")
    os.makedirs(f"{dest}/bin")
    shutil.copy2(src_bin, f"{dest}/bin/python3.11")
    os.symlink("python3.11", f"{dest}/bin/python3")
    shutil.copytree("/usr/lib/python3.11", f"{dest}/lib/python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("dist-packages", "site-packages", "__pycache__", "EXTERNALLY-MANAGED"))
    # Store files have mtime 1, so timestamp-checked .pyc files would be stale: compile them
    # unchecked, as a packaged interpreter ships them.
    subprocess.run([f"{dest}/bin/python3.11", "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
                    f"{dest}/lib/python3.11"], check=False, capture_output=True)


def _toolchain_tree(dest: str, with_lld: bool) -> None:
    swift_bin = os.path.dirname(os.path.realpath(shutil.which("swift") or "/opt/swift/usr/bin/swift"))
    clang = os.path.join(swift_bin, "clang-21")
    if not os.path.isfile(clang):
        found = sorted(f for f in os.listdir(swift_bin) if f.startswith("clang-") and f[6:].isdigit())
        if not found:
            raise SystemExit(f"fixture toolchain: no clang-N in {swift_bin}")
        clang = os.path.join(swift_bin, found[-1])
    os.makedirs(f"{dest}/bin")
    shutil.copy2(clang, f"{dest}/bin/{os.path.basename(clang)}")
    for name in ("clang", "clang++", "clang-cpp"):
        os.symlink(os.path.basename(clang), f"{dest}/bin/{name}")
    if with_lld and os.path.isfile(os.path.join(swift_bin, "lld")):
        shutil.copy2(os.path.join(swift_bin, "lld"), f"{dest}/bin/lld")
        for name in ("ld.lld", "ld64.lld", "lld-link", "wasm-ld"):
            os.symlink("lld", f"{dest}/bin/{name}")
    resource = os.path.join(os.path.dirname(swift_bin), "lib", "clang")
    if os.path.isdir(resource):
        shutil.copytree(resource, f"{dest}/lib/clang", symlinks=True)


def _expression(busybox: str, python: str, toolchain: str) -> str:
    imports = ", ".join(PYTHON_IMPORTS)
    return f"""
let
  bb = builtins.storePath "{busybox}"; sh = "${{bb}}/bin/busybox";
  py = builtins.storePath "{python}";
  tc = builtins.storePath "{toolchain}";
  # A program: the text of bin/app (its store references are found by Nix's scan of the output).
  program = name: text: derivation {{
    inherit name text; system = "x86_64-linux"; builder = sh;
    args = [ "sh" "-c" "${{sh}} mkdir -p $out/bin && ${{sh}} printf '%s\\\\n' \\"$text\\" > $out/bin/app && ${{sh}} chmod 555 $out/bin/app" ];
  }};
  # Library i: 1 MiB of random bytes (binary code does not compress much), a text table and a
  # file naming library i+1 (so each refers to the next).
  lib = i: derivation {{
    name = "lib-${{toString i}}"; system = "x86_64-linux"; builder = sh;
    next = if i + 1 < {WIDE_PATHS} then builtins.elemAt libs (i + 1) else "";
    args = [ "sh" "-c" "${{sh}} mkdir -p $out/share && ${{sh}} head -c ${{toString (1048576 + i * 16384)}} /dev/urandom > $out/share/blob && ${{sh}} seq 1 ${{toString (40000 + i * 1000)}} > $out/share/table && ${{sh}} printf '%s\\\\n' \\"$next\\" > $out/share/next" ];
  }};
  libs = builtins.genList lib {WIDE_PATHS};
in {{
  python = program "python-app" ''
    #!${{sh}} sh
    exec ${{py}}/bin/python3.11 -c 'import {imports}; print("imported", len(__import__("sys").modules), "modules")'
  '';
  toolchain = program "toolchain-app" ''
    #!${{sh}} sh
    exec ${{tc}}/bin/clang --version
  '';
  wide = program "wide-app" ''
    #!${{sh}} sh
    # plugins: ${{builtins.concatStringsSep " " libs}}
    ${{sh}} cat ${{builtins.elemAt libs 3}}/share/next > /dev/null
    ${{sh}} head -c 262144 ${{builtins.elemAt libs 17}}/share/blob | ${{sh}} wc -c
    ${{sh}} wc -l < ${{builtins.elemAt libs 42}}/share/table
  '';
}}
"""


EXPECT = {"python": "imported", "toolchain": "clang version", "wide": "262144"}


def build(work: str, quick: bool, log=print) -> dict:
    """Builds (or reuses, when built with the same settings) the fixtures under WORK/fixtures.
    Returns {"cache": dir, "public_key": str, "workloads": {name: {...}}}."""
    fix = os.path.join(work, "fixtures")
    manifest = os.path.join(fix, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            m = json.load(f)
        if m.get("quick") == quick:
            log(f"fixtures: reusing {fix}")
            return m
    shutil.rmtree(fix, ignore_errors=True)
    os.makedirs(fix)
    store = os.path.join(fix, "nix-root")
    trees = os.path.join(fix, "trees")
    os.makedirs(trees)

    log("fixtures: python tree (byte-compiling the standard library)")
    _python_tree(f"{trees}/python3-3.11")
    log("fixtures: toolchain tree")
    _toolchain_tree(f"{trees}/llvm-toolchain", with_lld=not quick)
    os.makedirs(f"{trees}/busybox/bin")
    shutil.copy2("/bin/busybox", f"{trees}/busybox/bin/busybox")

    log("fixtures: nix-store --add (hashing the trees)")
    added = {n: nix(["nix-store", "--store", store, "--add", f"{trees}/{n}"]) for n in ("busybox", "python3-3.11", "llvm-toolchain")}
    expr = os.path.join(fix, "workloads.nix")
    with open(expr, "w") as f:
        f.write(_expression(added["busybox"], added["python3-3.11"], added["llvm-toolchain"]))
    log("fixtures: nix-build of the three programs and the 60 libraries")
    apps = {}
    for w in ("python", "toolchain", "wide"):
        apps[w] = nix(["nix-build", "--store", store, "--no-out-link", expr, "-A", w])

    sk, pk = os.path.join(fix, "bench.sk"), os.path.join(fix, "bench.pk")
    nix(["nix-store", "--generate-binary-cache-key", "nixfs-bench-1", sk, pk])
    public_key = open(pk).read().strip()
    everything = nix(["nix-store", "--store", store, "-qR"] + list(apps.values())).split("\n")
    nix(["nix", "store", "sign", "--store", store, "--key-file", sk] + everything)
    cache = os.path.join(fix, "cache")
    log(f"fixtures: nix copy of {len(everything)} paths to a zstd binary cache")
    nix(["nix", "copy", "--store", store, "--to", f"file://{cache}?compression=zstd"] + list(apps.values()))

    workloads = {}
    for w, app in apps.items():
        closure = nix(["nix-store", "--store", store, "-qR", app]).split("\n")
        nar_bytes = download = 0
        for p in closure:
            fields = narinfo_fields(os.path.join(cache, os.path.basename(p)[:32] + ".narinfo"))
            nar_bytes += int(fields["NarSize"])
            download += int(fields.get("FileSize", fields["NarSize"]))
        files = int(subprocess.run(
            f"find {' '.join(os.path.join(store, p.lstrip('/')) for p in closure)} -type f | wc -l",
            shell=True, check=True, capture_output=True, text=True).stdout)
        workloads[w] = {"app": app, "closure": closure, "closure_paths": len(closure), "nar_bytes": nar_bytes,
                        "download_bytes": download, "files": files, "expect": EXPECT[w]}
        log(f"fixtures: {w}: {len(closure)} paths, {files} files, NAR {nar_bytes / 2**20:.1f} MiB, "
            f"compressed {download / 2**20:.1f} MiB")
    # The chroot store is no longer needed: the cache holds everything.
    subprocess.run(["chmod", "-R", "u+w", store], check=False)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(trees, ignore_errors=True)
    m = {"quick": quick, "cache": cache, "public_key": public_key, "workloads": workloads}
    with open(manifest, "w") as f:
        json.dump(m, f, indent=1)
    return m
