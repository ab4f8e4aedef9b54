# nixfs: `make demo` and `make test` are the two entry points (README.md). Both install what they
# need on Debian 12 as root.
SHELL := /bin/bash
.DEFAULT_GOAL := build

# Build libraries (-dev), runtime (fuse3), and what the tests drive for real (nix-bin, busybox-static).
DEBS := pkg-config libfuse3-dev fuse3 libzstd-dev liblzma-dev libbz2-dev libsqlite3-dev \
        libcurl4-openssl-dev nix-bin busybox-static xz-utils zstd util-linux
SWIFT ?= swift
FUZZ_SECONDS ?= 300

.PHONY: deps build release test test-fast demo fuzz bench-formats clean bench-cache bench-store generate-csi bench-csi bench-fs bench-serve bench-takeover bench-chunk \
        bench bench-quick bench-deps soak-takeover

deps:
	@missing=$$(for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$(echo $$missing | sed 's/^/ /')"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v $(SWIFT) >/dev/null || { echo "make deps: swift 6.1+ is required on PATH"; exit 1; }
	@# DeployTests render the manifests with `kubectl kustomize`: the machine image ships kubectl;
	@# Debian's own (kubernetes-client 1.20) has a kustomize too old for them, so it is not a fallback.
	@command -v kubectl >/dev/null || { apt-get install -y -qq kubectl >/dev/null 2>&1 || \
	  echo "make deps: kubectl is not installed and no apt source has it: DeployTests will fail (install kubectl 1.27+)"; }
	@python3 -c 'import kubernetes_validate' 2>/dev/null || \
	  { echo "make deps: installing kubernetes-validate (PyPI)"; pip install -q kubernetes-validate==1.37.0; }
	@python3 -c 'import moto.server, boto3, flask' 2>/dev/null || \
	  { echo "make deps: installing moto (PyPI), the S3 server the s3:// tests run"; pip install -q 'moto[server]==5.2.1'; }

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release --product nixfs

# A failing run repeats its failures last: CI shows only the tail of the log.
# The build tests (real nix-build runs at a serve) go in a run of their own: beside the mount
# tests they made other suites' FUSE mounts and in-process tasks miss their deadlines (see
# Documentation/serve.md, Builds; not understood yet), alone both pass.
ISOLATED_TESTS := NixServeTests.BuildTests|CSINodeTests.BuildVolumeTests
test: deps
	$(SWIFT) build --build-tests
	@log=$$(mktemp); set -o pipefail; \
	{ $(SWIFT) test --skip-build --skip '$(ISOLATED_TESTS)' && $(SWIFT) test --skip-build --filter '$(ISOLATED_TESTS)'; } 2>&1 | tee $$log; status=$$?; \
	if [ $$status -ne 0 ]; then \
	  echo "== make test failed (exit $$status); the failures again:"; \
	  grep -E '✘|↳|error:|[Ff]atal|[Cc]rash|signal' $$log | tail -60; \
	fi; rm -f $$log; exit $$status

# The in-process tier (no FUSE mount, no mount namespace, no root needed): formats, threads, Nix's
# database, the chunk store, the cache client against loopback servers, the filesystem core.
# A contributor's loop; CI runs everything (`make test`).
FAST_TESTS := NixFormatsTests|ServeRouterTests|ThreadsTests|NixStateTests|ChunkStoreTests|BinaryCacheTests|SystemLibrariesTests|StoreFSTests.CoreTests|StoreFSTests.KernelViewTests
test-fast: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --filter '$(FAST_TESTS)'

demo: release
	bash scripts/demo.sh "$$($(SWIFT) build -c release --show-bin-path)/nixfs"

# libFuzzer over the NAR reader, the narinfo parser and the download path (NAR URLs, decompression,
# verification); not part of CI.
fuzz: deps
	$(SWIFT) build -c release --scratch-path .build-fuzz --product fuzz-nar \
	  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld
	$(SWIFT) build -c release --scratch-path .build-fuzz --product fuzz-narinfo \
	  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld
	$(SWIFT) build -c release --scratch-path .build-fuzz --product fuzz-download \
	  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld
	bash scripts/fuzz.sh .build-fuzz/release $(FUZZ_SECONDS)

bench-formats: deps
	$(SWIFT) build -c release --product nar-bench
	"$$($(SWIFT) build -c release --show-bin-path)/nar-bench" 1024 5

clean:
	rm -rf .build .build-*

# Chunk store figures: ingest MB/s, cold random reads, stored bytes vs xz/zstd NARs, dedup (root: drops caches).
bench-store: deps
	$(SWIFT) build -c release --product store-bench
	"$$($(SWIFT) build -c release --show-bin-path)/store-bench"

# Binary cache client: NAR download+decompress+verify MB/s per core, and a 1,000-path closure at 20 ms.
bench-cache: deps
	$(SWIFT) build -c release --product cache-bench
	"$$($(SWIFT) build -c release --show-bin-path)/cache-bench"

# Regenerates the CSI code from the spec (needs protoc and the two Swift plugins; not part of CI:
# the generated code is committed). PLUGINS is a folder holding protoc-gen-swift and
# protoc-gen-grpc-swift-2, built from swift-protobuf and grpc-swift-protobuf.
PLUGINS ?= /tmp/protogen/.build/release
generate-csi:
	protoc --plugin=protoc-gen-swift=$(PLUGINS)/protoc-gen-swift \
	  --plugin=protoc-gen-grpc-swift-2=$(PLUGINS)/protoc-gen-grpc-swift-2 \
	  -I spec/csi -I /usr/include \
	  --swift_out=Visibility=Public:Sources/CSINode/Generated \
	  --grpc-swift-2_out=Visibility=Public,Client=true,Server=true:Sources/CSINode/Generated \
	  csi.proto

# nixfs serve: pull-through and NAR reassembly MiB/s; chunk requests/s and MiB/s against nginx serving
# the same bytes (installs nginx-light and wrk if missing). Writes bench/serve/serve-bench.md.
bench-serve: release
	@command -v nginx >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light wrk >/dev/null; }
	bash bench/serve-bench.sh "$$($(SWIFT) build -c release --show-bin-path)/nixfs"

# The longest pause a reader sees while the node daemon is taken over (10 times) and killed and
# restarted with a keeper (5 times), against the same reader with no switch. Writes
# bench/takeover/results/takeover-bench.md.
bench-takeover: release
	flock /tmp/nixfs-bench.lock bash bench/takeover-bench.sh "$$($(SWIFT) build -c release --show-bin-path)/nixfs"

# TakeoverTests' pod-under-takeovers test 30 times in a row beside one busy loop per core (issue 25).
# Writes bench/takeover/results/soak.md.
soak-takeover: deps
	$(SWIFT) build --build-tests
	flock /tmp/nixfs-bench.lock bash bench/takeover-soak.sh $${RUNS:-30}

# CSI publish latency of a 1,000-path closure from a cache 20 ms away, on a cold node.
bench-csi: release
	bash bench/csi-publish.sh "$$($(SWIFT) build -c release --show-bin-path)/nixfs"

# The mount against the local disk and squashfuse: warm/cold reads of a 1 GiB file, find+stat over
# 100,000 files (installs squashfuse and squashfs-tools if missing).
bench-fs: release
	bash bench/fs-bench.sh "$$($(SWIFT) build -c release --show-bin-path)/nixfs"

# Cold-start benchmark (Documentation/benchmarks.md): eager `nix copy` against nixfs cold/prefetch/
# warm/hot, three workloads, two simulated networks, page cache for 1-8 pods. Needs root.
# `make bench` writes Documentation/benchmarks.md (about 15 minutes after the release build);
# `make bench-quick` (3 runs, a smaller toolchain path; under 10 minutes after the build) writes
# bench/coldstart/quick/benchmarks.md.
BENCH_DEBS := python3.11 nix-bin busybox-static util-linux fuse3
BENCH_PIP := matplotlib==3.11.2 grpcio==1.85.1 grpcio-tools==1.85.1
bench-deps:
	@missing=$$(for p in $(BENCH_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@python3 -c 'import matplotlib, grpc, grpc_tools' 2>/dev/null || pip install -q $(BENCH_PIP)

bench: release bench-deps
	python3 bench/coldstart/harness.py --nixfs "$$($(SWIFT) build -c release --show-bin-path)/nixfs" \
	  --runs 5 --out Documentation --command "make bench"

# Chunk-lazy nodes behind an in-cluster `nixfs serve` (Documentation/benchmarks-chunk.md): eager,
# nixfs-cold, nixfs-chunk, nixfs-chunk-profiled, nixfs-chunk-first, and 1-8 nodes at once; the serve
# in its own network namespace. About 15 minutes after the release build.
bench-chunk: release bench-deps
	flock /tmp/nixfs-bench.lock python3 bench/coldstart/chunk.py --nixfs "$$($(SWIFT) build -c release --show-bin-path)/nixfs" \
	  --runs 3 --out Documentation

bench-quick: release bench-deps
	python3 bench/coldstart/harness.py --nixfs "$$($(SWIFT) build -c release --show-bin-path)/nixfs" \
	  --quick --runs 3 --out bench/coldstart/quick --command "make bench-quick"
