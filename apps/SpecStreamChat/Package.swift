// swift-tools-version:5.9
// A small SwiftUI chat that starts (or connects to) `specstream-mlx serve`
// and streams replies over its OpenAI-compatible API. Build: `swift run`.
import PackageDescription

let package = Package(
    name: "SpecStreamChat",
    platforms: [.macOS(.v14)],
    targets: [
        .executableTarget(name: "SpecStreamChat", path: "Sources/SpecStreamChat")
    ]
)
