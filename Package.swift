// swift-tools-version: 6.1
import PackageDescription

// Layers, bottom up (a lower layer never imports a higher one):
//   C shims, SystemCalls, Threads, SQLiteDatabase -> NixFormats (pure) -> NixState (Nix's database
//   for a closure) / BinaryCache -> ChunkStore
//   -> StoreFS (the FUSE-free core) -> FuseMount (libfuse) -> NodeDaemon (substitution, control)
//   -> CSINode / NixServe -> nixfs;
//   NodeControl (the local control protocol) sits beside them, under the filesystem and CSI.
//   StoreFS knows no cache client: it fetches through its Materialiser protocol.
let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
  name: "nixfs",
  platforms: [.macOS(.v14)],
  products: [
    .executable(name: "nixfs", targets: ["nixfs"])
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
    .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
    .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
    .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
    .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
    .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
    .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
    .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
    .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
    .package(url: "https://github.com/swiftlang/swift-subprocess.git", from: "1.0.2"),
    .package(url: "https://github.com/apple/swift-system.git", from: "1.4.0"),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.8.0"),
  ],
  targets: [
    // C libraries. Each shim.h wraps the macros and variadic functions Swift cannot call.
    .systemLibrary(
      name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev", "fuse3"])]),
    .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
    .systemLibrary(name: "CLzma", pkgConfig: "liblzma", providers: [.apt(["liblzma-dev"])]),
    .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),
    .systemLibrary(name: "CBzip2", providers: [.apt(["libbz2-dev"])]),
    // Unix calls Swift cannot make directly: descriptor passing over Unix sockets (SCM_RIGHTS,
    // for the FUSE connection's takeover), fallocate and sync_file_range.
    .systemLibrary(name: "CUnix"),
    .systemLibrary(
      name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),

    // The git commit of the build, generated before each build (Plugins/BuildInfoPlugin).
    .plugin(name: "BuildInfoPlugin", capability: .buildTool()),
    .target(name: "BuildInfo", plugins: ["BuildInfoPlugin"]),

    // System calls: the one EINTR loop, errors that name the call, writing a buffer whole.
    .target(name: "SystemCalls", swiftSettings: strict),

    // Threads: the lock box that can be waited on (`Locked`), the readers-writer lock, and the
    // one pool for blocking work with its async entry point.
    .target(name: "Threads", swiftSettings: strict),

    // Nix formats: NAR, narinfo, Nix32, store paths, signatures. Pure, no I/O.
    .target(
      name: "NixFormats",
      dependencies: ["BuildInfo", .product(name: "Crypto", package: "swift-crypto")],
      swiftSettings: strict),

    // One SQLite wrapper (connections, cached statements, typed binds) for the chunk store's index
    // and the narinfo cache.
    .target(name: "SQLiteDatabase", dependencies: ["CSQLite"], swiftSettings: strict),

    // Nix's own state for a closure: the database Nix would have written after substituting it,
    // and the directories Nix's local store expects under /nix/var/nix (a layer over a view).
    .target(
      name: "NixState",
      dependencies: ["NixFormats", "SQLiteDatabase", .product(name: "Crypto", package: "swift-crypto")],
      swiftSettings: strict),

    // Binary cache client: substituters, narinfo cache, NAR download, decompression, verification.
    .target(
      name: "BinaryCache",
      dependencies: [
        "NixFormats", "CCurl", "CZstd", "CLzma", "CBzip2", "SQLiteDatabase", "Threads",
        .product(name: "Logging", package: "swift-log"),
        .product(name: "CoreMetrics", package: "swift-metrics"),
      ],
      swiftSettings: strict),

    // Chunk store: FastCDC chunks, zstd, SQLite index, manifests, GC, fsck.
    .target(
      name: "ChunkStore",
      dependencies: [
        "NixFormats", "CZstd", "CSQLite", "SQLiteDatabase", "CUnix", "SystemCalls", "Threads",
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: strict),

    // The node's local control protocol: the control socket (JSON lines, descriptor passing),
    // the handover record and the keeper, signals. Shared by the daemon and the CSI plugin.
    .target(
      name: "NodeControl",
      dependencies: ["CUnix", "NixFormats", "SystemCalls", "Threads", .product(name: "Logging", package: "swift-log")],
      swiftSettings: strict),

    // The filesystem core, FUSE-free: inodes, trees, views, the negative cache, fetch
    // coordination through the Materialiser seam; it answers with reply values (Replier).
    .target(
      name: "StoreFS",
      dependencies: [
        "NixFormats", "ChunkStore", "SystemCalls", "Threads",
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "CoreMetrics", package: "swift-metrics"),
      ],
      swiftSettings: strict),

    // The FUSE adapter, the only importer of libfuse: low-level callbacks into the core, the
    // session, the mountpoint's checks, the connection's takeover.
    .target(
      name: "FuseMount",
      dependencies: [
        "StoreFS", "NixFormats", "NodeControl", "SystemCalls", "Threads", "CFuse3",
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: strict),

    // The node daemon: the mount plus the control socket, and Substitution, the materialiser that
    // fetches from the binary caches (the composition root of the layers below).
    .target(
      name: "NodeDaemon",
      dependencies: [
        "StoreFS", "FuseMount", "BinaryCache", "ChunkStore", "NixFormats", "NixState", "NodeControl", "SystemCalls",
        "Threads", .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: strict),

    // CSI Identity and Node services. Generated code (Generated/) comes from ../shared/spec/csi.proto
    // via `make generate-csi`; it is committed so builds need no protoc.
    .target(
      name: "CSINode",
      dependencies: [
        "NixFormats", "NixState", "NodeControl", "Threads",
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "CoreMetrics", package: "swift-metrics"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "Subprocess", package: "swift-subprocess"),
        .product(name: "SystemPackage", package: "swift-system"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: strict),

    // `nixfs serve`: an in-cluster binary cache that pulls each path through from upstream once,
    // verified, into a chunk store, and serves it to Nix and to nodes. Beside the CSI layer: it
    // needs the cache client and the chunk store, not the filesystem.
    .target(
      name: "NixServe",
      dependencies: [
        "NixFormats", "BinaryCache", "ChunkStore", "SystemCalls", "Threads",
        .product(name: "Hummingbird", package: "hummingbird"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "Subprocess", package: "swift-subprocess"),
        .product(name: "SystemPackage", package: "swift-system"),
        .product(name: "HTTPTypes", package: "swift-http-types"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Prometheus", package: "swift-prometheus"),
      ],
      swiftSettings: strict),

    .executableTarget(
      name: "nixfs",
      dependencies: [
        "NixFormats", "BinaryCache", "ChunkStore", "StoreFS", "FuseMount", "NodeDaemon", "NodeControl", "CSINode", "NixServe",
        "SystemCalls", "Threads",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Hummingbird", package: "hummingbird"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "CoreMetrics", package: "swift-metrics"),
        .product(name: "Prometheus", package: "swift-prometheus"),
      ],
      swiftSettings: strict),

    // Release-mode micro-benchmarks (`make bench-formats`).
    .executableTarget(
      name: "nar-bench", dependencies: ["NixFormats"], path: "bench/NarBench",
      swiftSettings: strict),

    .executableTarget(
      name: "cache-bench", dependencies: ["BinaryCache", "NixFormats", "CZstd", "CLzma"], path: "bench/CacheBench",
      swiftSettings: strict),
    .executableTarget(
      name: "store-bench", dependencies: ["ChunkStore", "NixFormats"], path: "bench/StoreBench",
      swiftSettings: strict),

    // libFuzzer targets (`make fuzz`); without -DFUZZING they replay files given as arguments.
    .systemLibrary(name: "CFuzzSupport", path: "Fuzz/CFuzzSupport"),
    .target(name: "FuzzDriver", dependencies: ["CFuzzSupport"], path: "Fuzz/FuzzDriver", swiftSettings: strict),
    .executableTarget(
      name: "fuzz-nar", dependencies: ["NixFormats", "FuzzDriver"], path: "Fuzz/FuzzNAR",
      swiftSettings: strict),
    .executableTarget(
      name: "fuzz-narinfo", dependencies: ["NixFormats", "FuzzDriver"], path: "Fuzz/FuzzNarInfo",
      swiftSettings: strict),
    .executableTarget(
      name: "fuzz-download", dependencies: ["BinaryCache", "NixFormats", "FuzzDriver"], path: "Fuzz/FuzzDownload",
      swiftSettings: strict),

    .target(name: "TestSupport", dependencies: ["NixFormats", "NodeControl"], path: "Tests/TestSupport", swiftSettings: strict),
    .testTarget(
      name: "NixFormatsTests", dependencies: ["NixFormats", "TestSupport"], swiftSettings: strict),
    .testTarget(name: "ThreadsTests", dependencies: ["Threads"], swiftSettings: strict),
    .testTarget(
      name: "NixStateTests", dependencies: ["NixState", "NixFormats", "TestSupport", "CSQLite"], swiftSettings: strict),
    .testTarget(name: "NixServeTests", dependencies: ["TestSupport", "NixFormats", "ChunkStore"], swiftSettings: strict),
    // The serve's routes in process (HummingbirdTesting, no socket): the fast tier of the serve.
    .testTarget(
      name: "ServeRouterTests",
      dependencies: [
        "NixServe", "BinaryCache", "ChunkStore", "NixFormats", "TestSupport",
        .product(name: "HummingbirdTesting", package: "hummingbird"),
      ],
      swiftSettings: strict),
    .testTarget(
      name: "BinaryCacheTests", dependencies: ["BinaryCache", "TestSupport"], swiftSettings: strict),
    .testTarget(
      name: "ChunkStoreTests", dependencies: ["ChunkStore", "TestSupport"], swiftSettings: strict),
    .testTarget(
      name: "StoreFSTests", dependencies: ["NixFormats", "TestSupport", "StoreFS", "ChunkStore"], swiftSettings: strict),
    .testTarget(
      name: "CSINodeTests",
      dependencies: [
        "CSINode", "NodeControl", "TestSupport", "NixFormats",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
      ],
      swiftSettings: strict),
    .testTarget(name: "DeployTests", dependencies: ["TestSupport"], swiftSettings: strict),
    .testTarget(
      name: "SystemLibrariesTests",
      dependencies: ["CFuse3", "CZstd", "CLzma", "CSQLite", "CCurl"],
      swiftSettings: strict),
  ],
  swiftLanguageModes: [.v6]
)
