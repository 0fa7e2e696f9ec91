import Foundation

/// A draft tree's topology, as the exporter stores it (`specstream.trees`).
///
/// Node 0 is the root (the token the model just produced); node `i > 0` at
/// depth `d` takes the `rank[i]`-th best token of stream `d` of the last
/// accepted row. Nodes are parents-first. Mirrors `specstream_mlx/tree.py`.
public struct DraftTree {
    public let parents: [Int]
    public let depth: [Int]
    public let rank: [Int]
    /// Children of each node, best draft (lowest rank) first.
    public let children: [[Int]]
    /// `visible[i][k]`: node `k` is node `i` or one of its ancestors.
    public let visible: [[Bool]]

    public init(parents: [Int], depth: [Int], rank: [Int]) {
        self.parents = parents
        self.depth = depth
        self.rank = rank
        var kids = Array(repeating: [Int](), count: parents.count)
        for node in parents.indices where parents[node] >= 0 {
            kids[parents[node]].append(node)
        }
        children = kids.map { list in list.sorted { rank[$0] < rank[$1] } }
        visible = parents.indices.map { node in
            var row = Array(repeating: false, count: parents.count)
            var k = node
            while k >= 0 {
                row[k] = true
                k = parents[k]
            }
            return row
        }
    }

    public var size: Int { parents.count }
    public var maxDepth: Int { depth.max() ?? 0 }

    /// How many top tokens of stream `d` (1-based) the tree uses.
    public func width(atDepth d: Int) -> Int {
        var most = 0
        for node in parents.indices where depth[node] == d {
            most = max(most, rank[node] + 1)
        }
        return most
    }

    /// Greedy verification: follow the child equal to the parent's argmax.
    ///
    /// - Returns: accepted node indices, root first.
    public func acceptGreedy(tokens: [Int], argmax: [Int]) -> [Int] {
        var path = [0]
        while let next = children[path.last!].first(where: { tokens[$0] == argmax[path.last!] }) {
            path.append(next)
        }
        return path
    }

    /// Tree rejection sampling with deterministic top-k drafts (`verify.accept_sampling`).
    ///
    /// At each node its children are tried best first; child `c` is accepted with
    /// probability `p(c) / (1 - mass of the children already rejected)`.
    ///
    /// - Parameters:
    ///   - tokens: token of each node.
    ///   - childProb: `p_parent(token)` of each node under the target distribution (entry 0 unused).
    ///   - uniform: one U(0, 1) draw per node.
    /// - Returns: the accepted path, and the tokens to remove from the last node's
    ///   distribution before drawing the next token (its rejected children).
    public func acceptSampling(tokens: [Int], childProb: [Double], uniform: [Double]) -> (path: [Int], rejected: [Int]) {
        var path = [0]
        while true {
            var remaining = 1.0
            var rejected: [Int] = []
            var moved = false
            for child in children[path.last!] {
                let p = childProb[child]
                if remaining > 0, uniform[child] * remaining < p {
                    path.append(child)
                    moved = true
                    break
                }
                remaining -= p
                rejected.append(tokens[child])
            }
            if !moved { return (path, rejected) }
        }
    }
}
