#!/usr/bin/env bash
# `make demo`: builds a small signed binary cache with real Nix from an embedded example, serves it
# on 127.0.0.1, mounts nixfs lazily, runs a program from the mount, and shows what was fetched.
# Leaves no mount or process behind, even on Ctrl-C.
set -euo pipefail
nixfs=${1:?usage: demo.sh PATH-TO-nixfs}
repo=$(cd "$(dirname "$0")/.." && pwd)
# The project's Nix settings (scripts/nix/nix.conf) and none of the machine's: no build users, no
# sandbox, no substituters, whatever /etc/nix, ~/.config/nix or the caller's NIX_CONFIG say.
export NIX_CONF_DIR="$repo/scripts/nix" NIX_USER_CONF_FILES= NIX_CONFIG= NIX_REMOTE=
work=$(mktemp -d /tmp/nixfs-demo.XXXXXX)
daemon= server=
cleanup() {
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  mountpoint -q "$work/mnt" 2>/dev/null && fusermount3 -u -z "$work/mnt" || true
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a Nix command quietly; when it fails, shows what Nix said (its error: lines, or the tail).
quiet() {
  local err="$work/stderr" status=0
  "$@" 2>"$err" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "demo: '$*' failed (exit $status):" >&2
    { grep -A20 '^error:' "$err" || tail -20 "$err"; } | sed 's/^/   /' >&2
    exit "$status"
  fi
}

echo "== 1. An example closure, built by real Nix with a busybox builder, signed"
mkdir -p "$work/busybox/bin" && cp /bin/busybox "$work/busybox/bin/"
bb=$(quiet nix-store --store "$work/root" --add "$work/busybox")
cat > "$work/example.nix" <<NIX
let bb = builtins.storePath "$bb"; sh = "\${bb}/bin/busybox"; in rec {
  # A large path the program references but never reads: a lazy store never fetches it.
  manual = derivation { name = "hello-manual"; system = "x86_64-linux"; builder = sh;
    args = ["sh" "-c" "\${sh} mkdir -p \$out/share; \${sh} head -c 8000000 /dev/urandom > \$out/share/manual.bin"]; };
  greeting = derivation { name = "greeting"; system = "x86_64-linux"; builder = sh;
    args = ["sh" "-c" "\${sh} mkdir -p \$out/share; echo 'Hello from a lazily served /nix/store!' > \$out/share/greeting"]; };
  hello = derivation { name = "hello"; system = "x86_64-linux"; builder = sh;
    args = ["sh" "-c" "\${sh} mkdir -p \$out/bin; printf '#!\${sh} sh\n# manual: \${manual}\n\${sh} cat \${greeting}/share/greeting\n' > \$out/bin/hello; \${sh} chmod +x \$out/bin/hello"]; };
}
NIX
hello=$(quiet nix-build --store "$work/root" --no-out-link "$work/example.nix" -A hello)
closure=$(quiet nix-store --store "$work/root" -qR "$hello")
quiet nix-store --generate-binary-cache-key demo-key-1 "$work/sk" "$work/pk"
quiet nix store sign --store "$work/root" --key-file "$work/sk" $closure
quiet nix copy --store "$work/root" --to "file://$work/cache?compression=zstd" $closure
echo "$closure" | sed 's/^/   /'

echo "== 2. Serve the cache on 127.0.0.1 and mount nixfs (empty state directory)"
coproc SERVER { exec python3 "$repo/scripts/cache-server.py" --dir "$work/cache" --log "$work/requests.log"; }
server=$SERVER_PID
read -r _ port <&"${SERVER[0]}"
mkdir -p "$work/mnt"
"$nixfs" mount --state-dir "$work/state" --substituter "http://127.0.0.1:$port" \
  --trusted-public-key "$(cat "$work/pk")" --log-level warning "$work/mnt" &
daemon=$!
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { echo "demo: the mount did not come up"; exit 1; }
echo "   mounted at $work/mnt; ls: [$(ls "$work/mnt" | tr '\n' ' ')] (nothing fetched yet)"

echo "== 3. Run the program with the mount bound over /nix/store in a private mount namespace"
mkdir -p /nix/store
unshare -m --propagation private sh -c "mount --bind '$work/mnt' /nix/store && exec $hello/bin/hello" | sed 's/^/   /'

echo "== 4. What crossed the wire"
# Per path of the closure: fetched (its NAR was asked for) or left upstream, in MiB.
python3 - "$work/requests.log" "$work/cache" $closure <<'PY' | sed 's/^/   /'
import json, os, sys
log, cache, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
asked = {}
for line in open(log):
    r = json.loads(line)
    if r["path"].startswith("/nar/"):
        asked[r["path"][1:]] = asked.get(r["path"][1:], 0) + r["bytes"]
mib = lambda n: f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
fetched = total = 0
for p in paths:
    info = dict(l.split(": ", 1) for l in open(os.path.join(cache, os.path.basename(p)[:32] + ".narinfo")).read().splitlines() if ": " in l)
    size = int(info["FileSize"])
    total += size
    if info["URL"] in asked:
        fetched += asked[info["URL"]]
        print(f"fetched      {mib(asked[info['URL']]):>10}  {p}")
    else:
        print(f"not fetched  {mib(size):>10}  {p}  (never read: it stayed in the cache)")
print(f"NAR bytes fetched: {mib(fetched)} of {mib(total)} in the closure ({100 * fetched // total}%)")
PY
echo "   paths on this node now: $(ls "$work/mnt" | wc -l) of $(echo "$closure" | wc -l)"
echo "   nix-store --dump of the served path hashes to the signed NarHash:"
want=$(sed -n 's/^NarHash: //p' "$work/cache/$(basename "$hello" | cut -c1-32).narinfo")
got="sha256:$(nix-hash --type sha256 --to-base32 "$(nix-store --dump "$work/mnt/$(basename "$hello")" | sha256sum | cut -d' ' -f1)")"
echo "   $got"; [ "$got" = "$want" ] || { echo "demo: hash mismatch (want $want)"; exit 1; }

echo
echo "demo: OK (cleaning up: unmount, stop the daemon and the cache server)"
