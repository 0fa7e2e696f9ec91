// swift-tools-version:5.10
// Speculative Streaming decoding with an exported Core ML package
// (`specstream-mlx export-coreml`): a library and a small command line.
// Build on macOS 15 / Apple silicon: `swift build -c release`.
import PackageDescription

let package = Package(
    name: "SpecStreamCoreML",
    platforms: [.macOS(.v15), .iOS(.v18)],
    products: [
        .library(name: "SpecStreamCoreML", targets: ["SpecStreamCoreML"]),
        .executable(name: "specstream-coreml", targets: ["specstream-coreml"]),
    ],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.1.0"),
    ],
    targets: [
        .target(name: "SpecStreamCoreML", path: "Sources/SpecStreamCoreML"),
        .executableTarget(
            name: "specstream-coreml",
            dependencies: [
                "SpecStreamCoreML",
                .product(name: "Tokenizers", package: "swift-transformers"),
            ],
            path: "Sources/specstream-coreml"
        ),
    ]
)
