#!/usr/bin/env bash
# Runs each libFuzzer target for N seconds from a seed corpus made with real Nix; prints the stats.
set -euo pipefail
bin=$1
seconds=${2:-300}
corpus=fuzz-corpus
mkdir -p "$corpus/nar" "$corpus/narinfo" "$corpus/download"
repo=$(cd "$(dirname "$0")/.." && pwd)
# The project's Nix settings (scripts/nix/nix.conf) and none of the machine's.
export NIX_CONF_DIR="$repo/scripts/nix" NIX_USER_CONF_FILES= NIX_CONFIG= NIX_REMOTE=
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
mkdir -p "$tmp/t/sub"
echo hello > "$tmp/t/a"; printf '#!/bin/sh\n' > "$tmp/t/sub/x"; chmod +x "$tmp/t/sub/x"; ln -s a "$tmp/t/l"
nix-store --dump "$tmp/t" > "$corpus/nar/seed-dir"
nix-store --dump "$tmp/t/a" > "$corpus/nar/seed-file"
nix-store --dump "$tmp/t/l" > "$corpus/nar/seed-link"
P=$(nix-store --store "$tmp/root" --add "$tmp/t")
nix-store --generate-binary-cache-key fuzz "$tmp/sk" "$tmp/pk"
nix store sign --store "$tmp/root" --key-file "$tmp/sk" "$P"
nix copy --store "$tmp/root" --to "file://$tmp/cache?compression=xz" "$P"
cp "$tmp"/cache/*.narinfo "$corpus/narinfo/seed"
cp "$tmp/cache/nix-cache-info" "$corpus/narinfo/seed-cache-info"
# fuzz-download: the first byte picks the compression (0 none, 1 xz), the rest is a NAR file or a URL.
{ printf '\001'; cat "$tmp"/cache/nar/*.nar.xz; } > "$corpus/download/seed-xz"
{ printf '\000'; cat "$corpus/nar/seed-dir"; } > "$corpus/download/seed-none"
for u in nar/0abc.nar.xz file:///etc/passwd ../../etc/passwd 'http://cache.example:8080/nar/x' 'gopher://127.0.0.1:70/_x'; do
  printf '\000%s' "$u" > "$corpus/download/seed-url-$(echo "$u" | md5sum | cut -c1-8)"
done
for target in nar narinfo download; do
  echo "== fuzz-$target for ${seconds}s"
  "$bin/fuzz-$target" -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 "$corpus/$target" 2>&1 |
    grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss|==.*ERROR|SUMMARY)' || true
done
