import Foundation

/// The chat's state: connection, conversation, and the live speed figures.
@MainActor
final class ChatViewModel: ObservableObject {
    struct Entry: Identifiable {
        let id = UUID()
        let role: String
        var text: String
    }

    // Defaults may come from the environment (handy with `swift run`).
    @Published var executable = ProcessInfo.processInfo.environment["SPECSTREAM_EXECUTABLE"]
        ?? "specstream-mlx"
    @Published var modelPath = ProcessInfo.processInfo.environment["SPECSTREAM_MODEL"] ?? ""
    @Published var serverURL = ProcessInfo.processInfo.environment["SPECSTREAM_SERVER_URL"]
        ?? "http://127.0.0.1:8080"
    @Published var entries: [Entry] = []
    @Published var input = ""
    @Published var status = "Start a server or connect to one."
    @Published var isGenerating = false
    @Published var tokensPerSecond = 0.0
    @Published var tokensPerForward = 0.0

    private var client: ChatClient?
    private var generation: Task<Void, Never>?

    var isConnected: Bool { client != nil }

    /// Launches `specstream-mlx serve` with a fresh API key and connects to it.
    func startServer() {
        client = nil
        status = "Starting the server (loading the model)…"
        let key = UUID().uuidString
        Task {
            do {
                let url = try await ServerController.shared.start(
                    executable: executable, model: modelPath, apiKey: key)
                client = ChatClient(baseURL: url, apiKey: key)
                serverURL = url.absoluteString
                status = "Server running at \(url.absoluteString)"
            } catch {
                status = "Could not start the server: \(error.localizedDescription)"
            }
        }
    }

    /// Connects to a server that is already running (its key, if any, from SPECSTREAM_API_KEY).
    func connect() {
        guard let url = URL(string: serverURL) else {
            status = "Not a URL: \(serverURL)"
            return
        }
        let key = ProcessInfo.processInfo.environment["SPECSTREAM_API_KEY"]
        let candidate = ChatClient(baseURL: url, apiKey: key)
        Task {
            do {
                try await candidate.checkHealth()
                client = candidate
                status = "Connected to \(url.absoluteString)"
            } catch {
                status = "Could not connect: \(error.localizedDescription)"
            }
        }
    }

    /// Sends the input as the next user message and streams the reply.
    func send() {
        let text = input.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let client = client, !text.isEmpty, !isGenerating else { return }
        input = ""
        entries.append(Entry(role: "user", text: text))
        let history = entries.map { ChatMessage(role: $0.role, content: $0.text) }
        entries.append(Entry(role: "assistant", text: ""))
        let index = entries.count - 1
        isGenerating = true
        status = "Generating…"
        generation = Task {
            let started = Date()
            var pieces = 0
            do {
                for try await event in client.stream(messages: history) {
                    switch event {
                    case .text(let piece):
                        entries[index].text += piece
                        pieces += 1  // about one token per piece
                        tokensPerSecond = Double(pieces) / max(Date().timeIntervalSince(started), 1e-3)
                    case .finished(let reason, let stats):
                        if let stats = stats {  // the server's own figures
                            tokensPerSecond = stats.generationTps
                            tokensPerForward = stats.tokensPerForward
                        }
                        status = "Done (\(reason))."
                    }
                }
                if Task.isCancelled { status = "Stopped." }
            } catch {
                status = Task.isCancelled ? "Stopped." : "Error: \(error.localizedDescription)"
            }
            isGenerating = false
        }
    }

    /// Stops the reply being generated (the server notices the closed connection).
    func stop() {
        generation?.cancel()
    }
}
