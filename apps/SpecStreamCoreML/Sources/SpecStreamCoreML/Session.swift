import CoreML
import Foundation

/// The logits of one call, read in place from the model's float16 outputs.
public struct StepOutput {
    let main: MLMultiArray  // (1, T, V)
    let streams: MLMultiArray  // (1, T, G, V)
    public let rows: Int

    /// Main-stream logits of row `r` (`V` values).
    public func mainRow(_ r: Int) -> [Float] {
        Self.row(main, offset: r * main.strides[1].intValue, stride: main.strides[2].intValue,
                 count: main.shape[2].intValue)
    }

    /// Logits of stream `j` (0-based: it predicts the token `j + 2` places after row `r`).
    public func streamRow(_ r: Int, stream j: Int) -> [Float] {
        let offset = r * streams.strides[1].intValue + j * streams.strides[2].intValue
        return Self.row(streams, offset: offset, stride: streams.strides[3].intValue,
                        count: streams.shape[3].intValue)
    }

    public func argmax(row r: Int) -> Int {
        let values = mainRow(r)
        var best = 0
        for v in values.indices where values[v] > values[best] { best = v }
        return best
    }

    private static func row(_ array: MLMultiArray, offset: Int, stride: Int, count: Int) -> [Float] {
        array.withUnsafeBufferPointer(ofType: Float16.self) { buffer in
            (0..<count).map { Float(buffer[offset + $0 * stride]) }
        }
    }
}

/// One conversation with a package: its state (the KV cache), the committed
/// length and the pending commit. Builds each call's inputs as `interface.json` says.
public final class SpecStreamSession {
    public let model: MLModel
    public let info: PackageInfo
    private var state: MLState
    /// Committed rows L (= position of the next token).
    public private(set) var length = 0
    private var pending: [(src: Int, dst: Int)] = []
    private var lastRows = 0

    public init(model: MLModel, info: PackageInfo) {
        self.model = model
        self.info = info
        state = model.makeState()
    }

    /// Forget the conversation (a fresh, empty cache).
    public func reset() {
        state = model.makeState()
        length = 0
        pending = []
        lastRows = 0
    }

    /// The smallest enumerated size that holds `rows` rows.
    public func size(for rows: Int) throws -> Int {
        guard let size = info.treeSizes.first(where: { $0 >= rows }) else {
            throw SpecStreamError.input("\(rows) rows exceed the largest size \(info.treeSizes.last ?? 0)")
        }
        return size
    }

    /// Whether a call of `rows` rows still fits the cache.
    public func fits(rows: Int) -> Bool {
        guard let size = try? size(for: rows) else { return false }
        return length + size <= info.maxContext
    }

    /// Runs one call: `tokens` at positions `length + depth`, row `i` seeing row `k` of
    /// this call iff `visible(i, k)` (and every committed row).
    public func call(tokens: [Int], depth: [Int], visible: (Int, Int) -> Bool) async throws -> StepOutput {
        let n = tokens.count
        let size = try size(for: n)
        let start = length
        guard start + size <= info.maxContext else {
            throw SpecStreamError.input("the cache is full (\(start) + \(size) > \(info.maxContext) slots)")
        }
        let iface = info.interface
        let slots = info.maxContext
        let ids = try MLMultiArray(shape: [1, NSNumber(value: size)], dataType: .int32)
        let positions = try MLMultiArray(shape: [1, NSNumber(value: size)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            for i in 0..<size { buffer[i] = Int32(i < n ? tokens[i] : 0) }
        }
        positions.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            for i in 0..<size { buffer[i] = Int32(start + (i < n ? depth[i] : i)) }
        }
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: size), NSNumber(value: slots)], dataType: .float16)
        let shown = Float16(iface.mask.visible)
        let hidden = Float16(iface.mask.hidden)
        mask.withUnsafeMutableBufferPointer(ofType: Float16.self) { buffer, _ in
            for i in 0..<size {
                let row = i * slots
                for s in 0..<slots { buffer[row + s] = hidden }
                if i < n {
                    for s in 0..<start { buffer[row + s] = shown }
                    for k in 0..<n where visible(i, k) { buffer[row + start + k] = shown }
                } else {
                    buffer[row + start + i] = shown  // padding rows see their own slot only
                }
            }
        }
        let write = try MLMultiArray(shape: [1], dataType: .int32)
        write[0] = NSNumber(value: start)
        let src = try MLMultiArray(shape: [NSNumber(value: info.commitSlots)], dataType: .int32)
        let dst = try MLMultiArray(shape: [NSNumber(value: info.commitSlots)], dataType: .int32)
        for k in 0..<info.commitSlots {
            let copy = k < pending.count ? pending[k] : (src: 0, dst: 0)  // unused: a no-op copy
            src[k] = NSNumber(value: copy.src)
            dst[k] = NSNumber(value: copy.dst)
        }
        var features: [String: Any] = [:]
        for (role, array) in [(Role.inputIds, ids), (Role.positionIds, positions), (Role.attentionMask, mask),
                              (Role.writeStart, write), (Role.commitSrc, src), (Role.commitDst, dst)] {
            let name = try iface.input(role)
            features[name] = array
        }
        let provider = try MLDictionaryFeatureProvider(dictionary: features)
        pending = []
        lastRows = n
        let out = try await model.prediction(from: provider, using: state)
        let mainName = try iface.output(Role.mainLogits)
        let streamName = try iface.output(Role.streamLogits)
        guard let main = out.featureValue(for: mainName)?.multiArrayValue,
              let streams = out.featureValue(for: streamName)?.multiArrayValue,
              main.dataType == .float16, streams.dataType == .float16
        else { throw SpecStreamError.output("\(mainName) / \(streamName) missing or not float16") }
        return StepOutput(main: main, streams: streams, rows: n)
    }

    /// Keeps rows `rows` (increasing indices into the last call's rows), in order.
    /// The slot copies run at the start of the next call.
    public func commit(rows: [Int]) throws {
        guard zip(rows, rows.dropFirst()).allSatisfy({ $0 < $1 }), (rows.last ?? -1) < lastRows else {
            throw SpecStreamError.input("commit rows must increase within the last call's rows: \(rows)")
        }
        let copies = rows.enumerated().filter { $0.offset != $0.element }
            .map { (src: length + $0.element, dst: length + $0.offset) }
        guard copies.count <= info.commitSlots else {
            throw SpecStreamError.input("\(copies.count) copies exceed the \(info.commitSlots) commit slots")
        }
        pending = copies
        length += rows.count
    }
}
