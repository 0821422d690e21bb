// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "tidepool",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tidepool", targets: ["tidepool"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
    ],
    targets: [
        // Pure decisions: wire codec, pool and session state machines, auth, config. No sockets.
        .target(
            name: "TidepoolCore",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        // The runtime: NIO channel handlers, listeners, timers, signals.
        .target(
            name: "Tidepool",
            dependencies: [
                "TidepoolCore",
                "CAres",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "tidepool",
            dependencies: [
                "Tidepool",
                "TidepoolCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // c-ares (Debian libc-ares-dev): server host names, as PgBouncer resolves them.
        .systemLibrary(name: "CAres", pkgConfig: "libcares", providers: [.apt(["libc-ares-dev"])]),
        // PostgreSQL's scanner (Debian libpg-query-dev), the SQL lexer's oracle in the tests.
        .systemLibrary(name: "CPgQuery", providers: [.apt(["libpg-query-dev"])]),
        // libFuzzer target over the decoders and state machines (scripts/fuzz.sh).
        .executableTarget(name: "tidepool-fuzz", dependencies: ["TidepoolCore"]),
        .testTarget(
            name: "TidepoolCoreTests",
            dependencies: ["TidepoolCore", .product(name: "NIOCore", package: "swift-nio")]
        ),
        // The runtime's handlers on EmbeddedChannels: they carry out the sessions' actions in order.
        .testTarget(
            name: "TidepoolTests",
            dependencies: [
                "Tidepool", "TidepoolCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The SQL lexer against PostgreSQL's own scanner on generated SQL.
        .testTarget(name: "LexerOracleTests", dependencies: ["TidepoolCore", "CPgQuery"]),
    ]
)
