import SwiftUI

struct ChatView: View {
    @ObservedObject var chat: ChatViewModel

    var body: some View {
        VStack(alignment: .leading, spacing: 10) {
            connection
            Divider()
            transcript
            composer
            HStack {
                Text(String(format: "%.1f tokens/s · %.2f tokens per forward",
                            chat.tokensPerSecond, chat.tokensPerForward))
                    .monospacedDigit()
                Spacer()
                Text(chat.status).lineLimit(1).truncationMode(.middle)
            }
            .font(.caption)
            .foregroundStyle(.secondary)
        }
        .padding()
    }

    private var connection: some View {
        Grid(alignment: .leading, horizontalSpacing: 8, verticalSpacing: 6) {
            GridRow {
                TextField("specstream-mlx (absolute path)", text: $chat.executable)
                TextField("checkpoint directory or repo id", text: $chat.modelPath)
                Button("Start server") { chat.startServer() }
                    .disabled(chat.modelPath.isEmpty || chat.isGenerating)
            }
            GridRow {
                TextField("server URL", text: $chat.serverURL)
                    .gridCellColumns(2)
                Button("Connect") { chat.connect() }
                    .disabled(chat.isGenerating)
            }
        }
        .textFieldStyle(.roundedBorder)
    }

    private var transcript: some View {
        ScrollViewReader { proxy in
            ScrollView {
                LazyVStack(alignment: .leading, spacing: 8) {
                    ForEach(chat.entries) { entry in
                        Text(entry.text.isEmpty ? "…" : entry.text)
                            .textSelection(.enabled)
                            .padding(8)
                            .background(entry.role == "user" ? Color.accentColor.opacity(0.15)
                                                             : Color.gray.opacity(0.12),
                                        in: RoundedRectangle(cornerRadius: 8))
                            .frame(maxWidth: .infinity,
                                   alignment: entry.role == "user" ? .trailing : .leading)
                            .id(entry.id)
                    }
                }
            }
            .onChange(of: chat.entries.last?.text) { _, _ in
                if let last = chat.entries.last {
                    proxy.scrollTo(last.id, anchor: .bottom)
                }
            }
        }
    }

    private var composer: some View {
        HStack {
            TextField("Message", text: $chat.input)
                .textFieldStyle(.roundedBorder)
                .onSubmit { chat.send() }
                .disabled(!chat.isConnected || chat.isGenerating)
            if chat.isGenerating {
                Button("Stop") { chat.stop() }
            } else {
                Button("Send") { chat.send() }
                    .disabled(!chat.isConnected || chat.input.isEmpty)
            }
        }
    }
}
