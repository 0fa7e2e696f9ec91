import Foundation

/// Starts `specstream-mlx serve` as a child process and stops it again.
///
/// The server is launched with `--port 0` (any free port) and `--watch-stdin`:
/// it prints `specstream-mlx: serving <model> at http://127.0.0.1:<port>` once
/// it answers requests, and exits by itself when our end of its standard input
/// closes, which also happens if this app crashes. A random API key, passed in
/// the environment (not on the command line, where `ps` would show it), keeps
/// other local programs from using the server.
final class ServerController {
    static let shared = ServerController()

    private var process: Process?
    private var stdinPipe: Pipe?

    enum StartError: LocalizedError {
        case exited(Int32)

        var errorDescription: String? {
            switch self {
            case .exited(let status):
                return "the server exited before it was ready (status \(status)); run the same "
                    + "command in a terminal to see its message"
            }
        }
    }

    /// Launches the server and returns its base URL once it is ready.
    ///
    /// - Parameters:
    ///   - executable: path of `specstream-mlx` (apps started from Finder get a
    ///     minimal PATH, so give an absolute path, e.g. the one in the bundle).
    ///   - model: checkpoint directory or Hugging Face repo id.
    ///   - apiKey: the key the server will require.
    func start(executable: String, model: String, apiKey: String) async throws -> URL {
        stop()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [executable, "serve", "--model", model, "--port", "0", "--watch-stdin"]
        var environment = ProcessInfo.processInfo.environment
        environment["SPECSTREAM_API_KEY"] = apiKey
        process.environment = environment
        let stdout = Pipe()
        let stdin = Pipe()
        process.standardOutput = stdout
        process.standardInput = stdin
        // Standard error (the server's log) is inherited: it shows in Xcode's console.
        try process.run()
        self.process = process
        self.stdinPipe = stdin

        for try await line in stdout.fileHandleForReading.bytes.lines {
            if line.hasPrefix("specstream-mlx: serving "),
               let start = line.range(of: "http://", options: .backwards),
               let url = URL(string: String(line[start.lowerBound...])) {
                return url
            }
        }
        process.waitUntilExit()
        stop()
        throw StartError.exited(process.terminationStatus)
    }

    /// Stops the server: closing its standard input is enough; SIGTERM as a fallback.
    func stop() {
        try? stdinPipe?.fileHandleForWriting.close()
        if let process = process, process.isRunning {
            process.terminate()
        }
        process = nil
        stdinPipe = nil
    }
}
