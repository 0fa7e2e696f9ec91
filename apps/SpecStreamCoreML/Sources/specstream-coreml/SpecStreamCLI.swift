import CoreML
import Foundation
import SpecStreamCoreML
import Tokenizers

/// `specstream-coreml --model NAME.mlpackage -p "prompt"`: Speculative Streaming
/// decoding with a package made by `specstream-mlx export-coreml`.
@main
struct SpecStreamCLI {
    static let usage = """
        usage: specstream-coreml --model NAME.mlpackage -p PROMPT [options]
          -m, --max-tokens N      tokens to generate (default 256)
          --temp T                sampling temperature (default 0: greedy)
          --top-p P, --min-p P, --top-k K
                                  sampling filters, mlx-lm's meaning (default off)
          --seed S                sampling seed (default 0)
          --tree-size N           one of the package's tree sizes (default: its own)
          --tokenizer ID|DIR      Hugging Face repo id or local folder (default: the package's)
          --compute-units U       all | cpu_and_gpu | cpu_only | cpu_and_ne (default: the package's)
          --raw                   do not apply the chat template
        """

    static func main() async {
        do {
            try await run(Array(CommandLine.arguments.dropFirst()))
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            exit(1)
        }
    }

    static func run(_ arguments: [String]) async throws {
        var options: [String: String] = [:]
        var raw = false
        var index = 0
        while index < arguments.count {
            let name = arguments[index]
            if name == "--raw" {
                raw = true
                index += 1
                continue
            }
            guard name.hasPrefix("-"), index + 1 < arguments.count else {
                throw SpecStreamError.input("unexpected argument \(name)\n\(usage)")
            }
            let aliases = ["-p": "--prompt", "-m": "--max-tokens"]
            options[aliases[name] ?? name] = arguments[index + 1]
            index += 2
        }
        guard let modelPath = options["--model"], let prompt = options["--prompt"] else {
            throw SpecStreamError.input("give --model and --prompt\n\(usage)")
        }
        func number<T: LosslessStringConvertible>(_ key: String, _ fallback: T) throws -> T {
            guard let text = options[key] else { return fallback }
            guard let value = T(text) else { throw SpecStreamError.input("\(key) takes a number, got \(text)") }
            return value
        }
        let maxTokens: Int = try number("--max-tokens", 256)
        let temperature: Float = try number("--temp", 0)
        let topK: Int = try number("--top-k", 0)
        let topP: Float = try number("--top-p", 1)
        let minP: Float = try number("--min-p", 0)
        let seed: UInt64 = try number("--seed", 0)
        let sampling = Sampling(temperature: temperature, topK: topK, topP: topP, minP: minP, seed: seed)
        if let problem = sampling.problem { throw SpecStreamError.input(problem) }
        let treeSize: Int? = options["--tree-size"].flatMap { Int($0) }

        // Load: compile the package, read its metadata, reload if it suggests other compute units.
        let compiled = try await MLModel.compileModel(at: URL(fileURLWithPath: modelPath))
        let configuration = MLModelConfiguration()
        let units: [String: MLComputeUnits] = ["all": .all, "cpu_and_gpu": .cpuAndGPU, "cpu_only": .cpuOnly,
                                               "cpu_and_ne": .cpuAndNeuralEngine]
        if let requested = options["--compute-units"] {
            guard let chosen = units[requested] else { throw SpecStreamError.input("unknown --compute-units \(requested)") }
            configuration.computeUnits = chosen
        }
        var model = try await MLModel.load(contentsOf: compiled, configuration: configuration)
        let info = try PackageInfo(model: model)
        if options["--compute-units"] == nil, info.computeUnits != configuration.computeUnits {
            configuration.computeUnits = info.computeUnits
            model = try await MLModel.load(contentsOf: compiled, configuration: configuration)
        }

        let source = options["--tokenizer"] ?? info.tokenizer
        var isFolder: ObjCBool = false
        let tokenizer: Tokenizer
        if FileManager.default.fileExists(atPath: source, isDirectory: &isFolder), isFolder.boolValue {
            tokenizer = try await AutoTokenizer.from(modelFolder: URL(fileURLWithPath: source))
        } else {
            tokenizer = try await AutoTokenizer.from(pretrained: source)
        }
        let ids: [Int]
        if raw {
            ids = tokenizer.encode(text: prompt)
        } else {
            ids = try tokenizer.applyChatTemplate(messages: [["role": "user", "content": prompt]])
        }

        let decoder = SpecStreamDecoder(session: SpecStreamSession(model: model, info: info))
        var generated: [Int] = []
        var printed = ""
        let stats = try await decoder.generate(prompt: ids, maxTokens: maxTokens, treeSize: treeSize,
                                               sampling: sampling) { tokens in
            generated += tokens
            let text = tokenizer.decode(tokens: generated)
            if text.hasPrefix(printed) {
                FileHandle.standardOutput.write(Data(text.dropFirst(printed.count).utf8))
                printed = text
            }
            return true
        }
        print()
        print(String(format: "[%d prompt tokens in %.2f s; %d tokens, %.1f tokens/s, %.2f tokens per forward, finish: %@]",
                     stats.promptTokens, stats.promptSeconds, stats.tokens, stats.tokensPerSecond,
                     stats.tokensPerForward, stats.finish))
    }
}
