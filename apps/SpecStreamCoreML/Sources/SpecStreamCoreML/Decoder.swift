import CoreML
import Foundation

/// Sampling settings with `verify.SamplingParams`' meaning (mlx-lm's):
/// greedy when `temperature == 0`; `topP` filters only when 0 < topP < 1 (0 and 1
/// are both off; 0 is stored as 1, as `SamplingParams` does); `minP` and `topK`
/// filter when > 0 (`topK` >= the vocabulary keeps every token).
public struct Sampling {
    public var temperature: Float = 0
    public var topK: Int = 0
    public var topP: Float = 1
    public var minP: Float = 0
    public var seed: UInt64 = 0

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, minP: Float = 0, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP == 0 ? 1 : topP  // the one "off" value
        self.minP = minP
        self.seed = seed
    }

    public var greedy: Bool { temperature == 0 }

    /// What is out of range (`SamplingParams`' checks and messages), or nil.
    public var problem: String? {
        if !(temperature >= 0 && temperature.isFinite) { return "temperature must be a finite number >= 0, got \(temperature)" }
        if !(topP >= 0 && topP <= 1) { return "top-p must be in [0, 1] (0 or 1: off), got \(topP)" }
        if topK < 0 { return "top-k must be >= 0 (0: off), got \(topK)" }
        if !(minP >= 0 && minP <= 1) { return "min-p must be in [0, 1] (0: off), got \(minP)" }
        return nil
    }

    /// The target distribution of one row of logits: the steps of `verify.target_logits`
    /// (mlx-lm's sampler) in its order, as `coreml/host.py`'s `target_probs`:
    /// log-softmax, then top-p, then min-p, then top-k (filtered tokens get -inf),
    /// then divide by the temperature and softmax.
    func probabilities(_ logits: [Float]) -> [Double] {
        let peak = Double(logits.max() ?? 0)
        let logTotal = peak + log(logits.reduce(0.0) { $0 + exp(Double($1) - peak) })
        var x = logits.map { Double($0) - logTotal }  // log-probabilities
        if topP < 1 {
            // Keep each token whose strictly better tokens hold less than topP of the mass.
            let descending = x.sorted(by: >)
            let limit = Double(topP) * descending.reduce(0.0) { $0 + exp($1) }
            var above = 0.0  // mass of the better tokens
            var threshold = descending[0]
            for value in descending {
                if above >= limit { break }
                threshold = value
                above += exp(value)
            }
            x = x.map { $0 < threshold ? -.infinity : $0 }
        }
        if minP > 0 {
            // Drop tokens below minP times the best token's probability.
            let cut = (x.max() ?? 0) + log(Double(minP))
            x = x.map { $0 < cut ? -.infinity : $0 }
        }
        if topK > 0, topK < x.count {
            let kth = x.sorted(by: >)[topK - 1]
            x = x.map { $0 < kth ? -.infinity : $0 }
        }
        let best = x.max() ?? 0
        let p = x.map { exp(($0 - best) / Double(temperature)) }
        let total = p.reduce(0, +)
        return p.map { $0 / total }
    }
}

/// A small seeded generator (SplitMix64), so sampled runs repeat.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

public struct GenerationStats {
    public var promptTokens = 0
    public var tokens = 0
    /// Decode calls (the prompt's calls are not counted).
    public var forwards = 0
    public var promptSeconds = 0.0
    public var decodeSeconds = 0.0
    /// `length`, `stop` (an end-of-sequence token) or `context` (the cache is full).
    public var finish = "length"

    public var tokensPerForward: Double { forwards > 0 ? Double(max(tokens - 1, 0)) / Double(forwards) : 0 }
    public var tokensPerSecond: Double { decodeSeconds > 0 ? Double(tokens) / decodeSeconds : 0 }
}

/// The Speculative Streaming loop over a package: prefill, then one call per
/// step that verifies the last tree, emits tokens and drafts the next tree
/// (`coreml/host.py`'s `generate`, itself the Python runtime's loop).
public final class SpecStreamDecoder {
    public let session: SpecStreamSession

    public init(session: SpecStreamSession) {
        self.session = session
    }

    /// Tokens of nodes 1..<n: node `i` takes the `rank[i]`-th best token of stream `depth[i]`.
    func drafts(_ out: StepOutput, row: Int, tree: DraftTree) -> [Int] {
        var table: [[Int]] = []
        for d in stride(from: 1, through: tree.maxDepth, by: 1) {
            let logits = out.streamRow(row, stream: d - 1)
            let k = tree.width(atDepth: d)
            var best: [Int] = []  // indices of the k largest, best first
            for v in logits.indices {
                if best.count < k || logits[v] > logits[best[best.count - 1]] {
                    let at = best.firstIndex(where: { logits[v] > logits[$0] }) ?? best.count
                    best.insert(v, at: at)
                    if best.count > k { best.removeLast() }
                }
            }
            table.append(best)
        }
        return (1..<tree.size).map { table[tree.depth[$0] - 1][tree.rank[$0]] }
    }

    /// Generates up to `maxTokens` tokens after `prompt`.
    ///
    /// - Parameters:
    ///   - treeSize: one of the package's tree sizes (default: its `tree_default`).
    ///   - onTokens: receives each step's new tokens; return `false` to stop.
    public func generate(prompt: [Int], maxTokens: Int, treeSize: Int? = nil, sampling: Sampling = Sampling(),
                         onTokens: ([Int]) -> Bool) async throws -> GenerationStats {
        let info = session.info
        guard !prompt.isEmpty else { throw SpecStreamError.input("the prompt is empty") }
        guard let tree = info.trees[treeSize ?? info.treeDefault] else {
            throw SpecStreamError.input("no tree of size \(treeSize ?? 0); sizes: \(info.treeSizes)")
        }
        var rng = SeededGenerator(state: sampling.seed)
        var stats = GenerationStats(promptTokens: prompt.count)
        session.reset()

        func choose(_ logits: [Float], excluding: [Int] = []) -> Int {
            if sampling.greedy {
                var best = 0
                for v in logits.indices where logits[v] > logits[best] { best = v }
                return best
            }
            var p = sampling.probabilities(logits)
            for token in excluding { p[token] = 0 }
            var u = Double.random(in: 0..<1, using: &rng) * p.reduce(0, +)
            for v in p.indices {
                u -= p[v]
                if u < 0 { return v }
            }
            return p.lastIndex(where: { $0 > 0 }) ?? 0
        }

        // Prefill: chunks of the largest size; rows are written in place, so nothing moves.
        let started = Date()
        let chunk = info.treeSizes.last!
        var out: StepOutput?
        for begin in stride(from: 0, to: prompt.count, by: chunk) {
            let part = Array(prompt[begin..<min(begin + chunk, prompt.count)])
            guard session.fits(rows: part.count) else { throw SpecStreamError.input("the prompt does not fit the context") }
            out = try await session.call(tokens: part, depth: Array(part.indices), visible: { $1 <= $0 })
            try session.commit(rows: Array(part.indices))
        }
        var last = out!
        var lastRow = last.rows - 1
        var token = choose(last.mainRow(lastRow))
        stats.promptSeconds = Date().timeIntervalSince(started)
        stats.tokens = 1
        let decodeStart = Date()
        if !onTokens([token]) || info.eosTokenIds.contains(token) {
            stats.finish = info.eosTokenIds.contains(token) ? "stop" : "length"
            return stats
        }

        while stats.tokens < maxTokens {
            guard session.fits(rows: tree.size) else {
                stats.finish = "context"
                break
            }
            let nodes = [token] + drafts(last, row: lastRow, tree: tree)
            let step = try await session.call(tokens: nodes, depth: tree.depth, visible: { tree.visible[$0][$1] })
            stats.forwards += 1
            let path: [Int]
            var rejected: [Int] = []
            if sampling.greedy {
                path = tree.acceptGreedy(tokens: nodes, argmax: (0..<tree.size).map { step.argmax(row: $0) })
            } else {
                var cache: [Int: [Double]] = [:]
                var childProb = Array(repeating: 0.0, count: tree.size)
                for node in 1..<tree.size {
                    let parent = tree.parents[node]
                    if cache[parent] == nil { cache[parent] = sampling.probabilities(step.mainRow(parent)) }
                    childProb[node] = cache[parent]![nodes[node]]
                }
                let uniform = (0..<tree.size).map { _ in Double.random(in: 0..<1, using: &rng) }
                let accepted = tree.acceptSampling(tokens: nodes, childProb: childProb, uniform: uniform)
                path = accepted.path
                rejected = accepted.rejected
            }
            try session.commit(rows: path)
            token = choose(step.mainRow(path.last!), excluding: rejected)
            var emitted = path.dropFirst().map { nodes[$0] } + [token]
            if let stop = emitted.firstIndex(where: { info.eosTokenIds.contains($0) }) {
                emitted = Array(emitted[...stop])
                stats.finish = "stop"
            }
            emitted = Array(emitted.prefix(maxTokens - stats.tokens))
            stats.tokens += emitted.count
            if !onTokens(emitted) || stats.finish == "stop" { break }
            last = step
            lastRow = path.last!
        }
        stats.decodeSeconds = Date().timeIntervalSince(decodeStart)
        return stats
    }
}
