import Foundation

/// One message of the conversation, as the OpenAI chat API takes it.
struct ChatMessage: Codable {
    var role: String
    var content: String
}

/// The speculative figures the server adds to the last chunk (`specstream`).
struct SpecStats: Decodable {
    let tokensPerForward: Double
    let generationTps: Double

    enum CodingKeys: String, CodingKey {
        case tokensPerForward = "tokens_per_forward"
        case generationTps = "generation_tps"
    }
}

enum StreamEvent {
    case text(String)
    case finished(reason: String, stats: SpecStats?)
}

enum ClientError: LocalizedError {
    case server(String)

    var errorDescription: String? {
        switch self {
        case .server(let message): return message
        }
    }
}

/// A minimal client for the server's `/v1/chat/completions` (streaming) and `/health`.
struct ChatClient {
    let baseURL: URL
    let apiKey: String?

    private struct RequestBody: Encodable {
        var model = "local"
        var messages: [ChatMessage]
        var stream = true
        var maxTokens: Int
        var temperature: Double

        enum CodingKeys: String, CodingKey {
            case model, messages, stream, temperature
            case maxTokens = "max_tokens"
        }
    }

    private struct Chunk: Decodable {
        struct Choice: Decodable {
            struct Delta: Decodable { let content: String? }
            let delta: Delta
            let finishReason: String?

            enum CodingKeys: String, CodingKey {
                case delta
                case finishReason = "finish_reason"
            }
        }
        struct ErrorDetail: Decodable { let message: String }

        let choices: [Choice]?
        let specstream: SpecStats?
        let error: ErrorDetail?
    }

    private func makeRequest(_ path: String) -> URLRequest {
        var request = URLRequest(url: baseURL.appendingPathComponent(path))
        if let apiKey = apiKey {
            request.setValue("Bearer \(apiKey)", forHTTPHeaderField: "Authorization")
        }
        return request
    }

    /// Throws unless `GET /health` answers 200.
    func checkHealth() async throws {
        let (data, response) = try await URLSession.shared.data(for: makeRequest("health"))
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        if status != 200 {
            throw ClientError.server(Self.errorMessage(data, status: status))
        }
    }

    /// Streams a reply. Cancelling the consuming task closes the connection,
    /// and the server stops generating.
    func stream(messages: [ChatMessage], maxTokens: Int = 512,
                temperature: Double = 0) -> AsyncThrowingStream<StreamEvent, Error> {
        var post = makeRequest("v1/chat/completions")
        post.httpMethod = "POST"
        post.setValue("application/json", forHTTPHeaderField: "Content-Type")
        post.timeoutInterval = 600
        let body = RequestBody(messages: messages, maxTokens: maxTokens, temperature: temperature)
        post.httpBody = try? JSONEncoder().encode(body)
        let request = post  // an immutable copy for the task below

        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    let (bytes, response) = try await URLSession.shared.bytes(for: request)
                    let status = (response as? HTTPURLResponse)?.statusCode ?? 0
                    if status != 200 {  // 400, 401, 429 ...: an OpenAI-style error body
                        var data = Data()
                        for try await byte in bytes { data.append(byte) }
                        throw ClientError.server(Self.errorMessage(data, status: status))
                    }
                    // Server-sent events: `data: {json}` lines, then `data: [DONE]`.
                    for try await line in bytes.lines {
                        guard line.hasPrefix("data: ") else { continue }
                        let payload = line.dropFirst("data: ".count)
                        if payload == "[DONE]" { break }
                        let chunk = try JSONDecoder().decode(Chunk.self, from: Data(payload.utf8))
                        if let error = chunk.error { throw ClientError.server(error.message) }
                        guard let choice = chunk.choices?.first else { continue }
                        if let text = choice.delta.content, !text.isEmpty {
                            continuation.yield(.text(text))
                        }
                        if let reason = choice.finishReason {
                            continuation.yield(.finished(reason: reason, stats: chunk.specstream))
                        }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    private static func errorMessage(_ data: Data, status: Int) -> String {
        struct Body: Decodable {
            struct Detail: Decodable { let message: String }
            let error: Detail
        }
        let message = (try? JSONDecoder().decode(Body.self, from: data))?.error.message
        return message ?? "the server answered HTTP \(status)"
    }
}
