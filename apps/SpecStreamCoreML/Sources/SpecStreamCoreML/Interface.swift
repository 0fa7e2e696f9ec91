import CoreML
import Foundation

/// The calling convention of an exported package.
///
/// It is `specstream_mlx/coreml/interface.json` in the Python package, copied
/// by the exporter into every package's metadata (key `specstream.interface`).
/// Roles (the dictionary keys below) are what this code is written against;
/// names, metadata keys and mask values are read from the file.
public struct Interface: Decodable {
    /// The `interface_version` this code implements.
    public static let interfaceVersion = 1
    /// Where the exporter puts the interface itself (its metadata role "interface").
    public static let interfaceKey = "specstream.interface"

    public struct Tensor: Decodable {
        public let name: String
        public let dtype: String
    }

    public struct MetadataEntry: Decodable {
        public let key: String
    }

    public struct Mask: Decodable {
        public let visible: Float
        public let hidden: Float
    }

    public let version: Int
    public let inputs: [String: Tensor]
    public let outputs: [String: Tensor]
    public let states: [String: Tensor]
    public let metadata: [String: MetadataEntry]
    public let mask: Mask

    enum CodingKeys: String, CodingKey {
        case version = "interface_version"
        case inputs, outputs, states, metadata, mask
    }

    /// Name of the input with `role` (`"input_ids"`, `"attention_mask"`, ...).
    public func input(_ role: String) throws -> String {
        guard let entry = inputs[role] else { throw SpecStreamError.interface("no input role \(role)") }
        return entry.name
    }

    public func output(_ role: String) throws -> String {
        guard let entry = outputs[role] else { throw SpecStreamError.interface("no output role \(role)") }
        return entry.name
    }

    public func metadataKey(_ role: String) throws -> String {
        guard let entry = metadata[role] else { throw SpecStreamError.interface("no metadata role \(role)") }
        return entry.key
    }
}

public enum SpecStreamError: Error, CustomStringConvertible {
    case interface(String)
    case metadata(String)
    case input(String)
    case output(String)

    public var description: String {
        switch self {
        case let .interface(text): return "package interface: \(text)"
        case let .metadata(text): return "package metadata: \(text)"
        case let .input(text): return "input: \(text)"
        case let .output(text): return "model output: \(text)"
        }
    }
}

/// What the decode loop needs to know about a package, from its `specstream.*` metadata.
public struct PackageInfo {
    public let interface: Interface
    public let gamma: Int
    public let streamLayers: Int
    public let mode: String
    public let maxContext: Int
    public let commitSlots: Int
    public let vocabSize: Int
    /// Enumerated row counts T, ascending; prefill uses the largest.
    public let treeSizes: [Int]
    public let trees: [Int: DraftTree]
    public let treeDefault: Int
    public let tokenizer: String
    public let eosTokenIds: Set<Int>
    public let quantization: String
    public let computeUnits: MLComputeUnits

    private struct TreeSpec: Decodable {
        let parents: [Int]
        let depth: [Int]
        let rank: [Int]
    }

    /// Reads the metadata of a loaded model (`modelDescription.metadata[.creatorDefinedKey]`).
    public init(model: MLModel) throws {
        let raw = model.modelDescription.metadata[MLModelMetadataKey.creatorDefinedKey]
        guard let metadata = raw as? [String: String] else {
            throw SpecStreamError.metadata("no creator-defined metadata: not a specstream-mlx export")
        }
        try self.init(metadata: metadata)
    }

    public init(metadata: [String: String]) throws {
        guard let text = metadata[Interface.interfaceKey], let data = text.data(using: .utf8) else {
            throw SpecStreamError.metadata("no \(Interface.interfaceKey): not a specstream-mlx export")
        }
        let interface = try JSONDecoder().decode(Interface.self, from: data)
        guard interface.version == Interface.interfaceVersion else {
            throw SpecStreamError.interface(
                "the package has interface version \(interface.version); this app reads version "
                    + "\(Interface.interfaceVersion). Export again with a matching specstream-mlx.")
        }
        func value(_ role: String) throws -> String {
            let key = try interface.metadataKey(role)
            guard let found = metadata[key] else { throw SpecStreamError.metadata("missing \(key)") }
            return found
        }
        func integer(_ role: String) throws -> Int {
            let text = try value(role)
            guard let number = Int(text) else { throw SpecStreamError.metadata("\(role) is not an integer: \(text)") }
            return number
        }
        func integers(_ role: String) throws -> [Int] {
            let text = try value(role)
            return try text.split(separator: ",").map { part in
                guard let number = Int(part) else { throw SpecStreamError.metadata("\(role): \(part) is not an integer") }
                return number
            }
        }
        self.interface = interface
        gamma = try integer("gamma")
        streamLayers = try integer("stream_layers")
        mode = try value("mode")
        maxContext = try integer("max_context")
        commitSlots = try integer("commit_slots")
        vocabSize = try integer("vocab_size")
        treeSizes = try integers("tree_sizes").sorted()
        treeDefault = try integer("tree_default")
        tokenizer = try value("tokenizer")
        let eos = try integers("eos_token_ids")
        eosTokenIds = Set(eos)
        quantization = try value("quantization")
        _ = try integer("format_version")
        _ = try integer("interface_version")
        let units = try value("compute_units")
        switch units {
        case "cpu_only": computeUnits = .cpuOnly
        case "cpu_and_gpu": computeUnits = .cpuAndGPU
        case "cpu_and_ne": computeUnits = .cpuAndNeuralEngine
        default: computeUnits = .all
        }
        let treeText = try value("trees")
        guard let treeData = treeText.data(using: .utf8) else {
            throw SpecStreamError.metadata("trees is not UTF-8")
        }
        let specs = try JSONDecoder().decode([String: TreeSpec].self, from: treeData)
        var trees: [Int: DraftTree] = [:]
        for (size, spec) in specs {
            guard let rows = Int(size), spec.parents.count == rows else {
                throw SpecStreamError.metadata("tree \(size) does not have \(size) nodes")
            }
            trees[rows] = DraftTree(parents: spec.parents, depth: spec.depth, rank: spec.rank)
        }
        self.trees = trees
        guard trees[treeDefault] != nil, treeSizes.allSatisfy({ trees[$0] != nil }) else {
            throw SpecStreamError.metadata("trees do not cover tree_sizes \(treeSizes)")
        }
    }
}

/// Role names used in this package (the keys of `interface.json`'s groups).
enum Role {
    static let inputIds = "input_ids"
    static let positionIds = "position_ids"
    static let attentionMask = "attention_mask"
    static let writeStart = "write_start"
    static let commitSrc = "commit_src"
    static let commitDst = "commit_dst"
    static let mainLogits = "main_logits"
    static let streamLogits = "stream_logits"
    /// The key/value cache states: the MLState holds them; this code never names them.
    static let keyCache = "key_cache"
    static let valueCache = "value_cache"
}
