"""Draft trees: pure functions over a small frozen dataclass.

A tree holds the rows of one verification forward. Node 0 is the *root*: the
token the main stream just produced. Node ``i > 0`` at depth ``d`` carries a
guess for the token ``d`` places after the root, taken from the ``rank``-th best
token of speculative stream ``d`` (streams predict ``t+1+j`` from position
``t``; see docs/design.md, "Streams").

Nodes are stored parents-first (every parent index is smaller than its
children's), which the builder guarantees and the functions here rely on only
through ``Tree.mask`` / ``children``, which accept any order.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class Tree:
    """One draft tree.

    Attributes:
        parents: ``(N,)`` parent index per node, ``-1`` for the root.
        depth: ``(N,)`` distance from the root.
        rank: ``(N,)`` top-k rank of the node's token in stream ``depth``
            (``-1`` for the root).
        tokens: ``(N,)`` token ids, or ``None`` for a topology-only template.
    """

    parents: np.ndarray
    depth: np.ndarray
    rank: np.ndarray
    tokens: Optional[np.ndarray] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return int(self.parents.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if self.size else 0

    @property
    def mask(self) -> np.ndarray:
        """``(N, N)`` bool: ``mask[i, k]`` is True iff ``k`` is ``i`` or an ancestor of ``i``."""
        if "mask" not in self._cache:
            self._cache["mask"] = ancestor_mask(self.parents)
        return self._cache["mask"]

    @property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children of each node, ordered by rank (best draft first)."""
        if "children" not in self._cache:
            kids: list[list[int]] = [[] for _ in range(self.size)]
            for i in np.argsort(self.rank, kind="stable"):
                p = int(self.parents[i])
                if p >= 0:
                    kids[p].append(int(i))
            self._cache["children"] = tuple(tuple(k) for k in kids)
        return self._cache["children"]

    def with_tokens(self, tokens: np.ndarray) -> "Tree":
        """The same topology carrying ``tokens`` (``(N,)`` ints)."""
        tokens = np.asarray(tokens).reshape(-1)
        assert tokens.shape[0] == self.size, "one token per node"
        return replace(self, tokens=tokens, _cache=self._cache)


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """Ancestor-or-self matrix of a forest given by parent indices.

    Args:
        parents: ``(N,)`` parent index per node, ``-1`` for roots; any order.

    Returns:
        ``(N, N)`` bool array, row ``i`` true at ``i`` and each ancestor of ``i``.
    """
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        k, hops = i, 0
        while k >= 0:
            mask[i, k] = True
            k = int(parents[k])
            hops += 1
            if hops > n:
                raise ValueError("parent indices contain a cycle")
    return mask


@functools.lru_cache(maxsize=64)
def build_tree(widths: Sequence[int], max_nodes: Optional[int] = None) -> Tree:
    """Topology of a draft tree.

    Every node at depth ``d - 1`` gets ``widths[d - 1]`` children, the top
    ``widths[d - 1]`` tokens of stream ``d`` (a cartesian tree, as in the
    paper: stream ``d``'s guesses do not depend on the guess at depth ``d-1``).
    With ``max_nodes``, only the ``max_nodes`` most promising nodes (root
    included) are kept, most promising = smallest sum of ranks along the path,
    then shallowest; that choice is closed under ancestors.

    Args:
        widths: children per node at each depth, e.g. ``(3, 2, 1)``; ``(1, 1, 1)``
            is a chain. The depth is ``len(widths)`` (at most gamma).
        max_nodes: optional cap on the number of rows, root included.

    Returns:
        A topology-only ``Tree`` in parents-first (breadth-first) order.
    """
    widths = tuple(int(w) for w in widths)
    if any(w < 1 for w in widths):
        raise ValueError(f"tree widths must be >= 1, got {widths}")
    if max_nodes is not None and max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    # Enumerate every path as a tuple of ranks; () is the root.
    paths: list[tuple[int, ...]] = [()]
    for depth in range(1, len(widths) + 1):
        paths += list(itertools.product(*(range(w) for w in widths[:depth])))
    if max_nodes is not None and len(paths) > max_nodes:
        order = sorted(range(len(paths)), key=lambda i: (sum(paths[i]), len(paths[i]), i))
        paths = [paths[i] for i in sorted(order[:max_nodes])]
    index = {p: i for i, p in enumerate(paths)}
    parents = np.array([index[p[:-1]] if p else -1 for p in paths], dtype=np.int64)
    depth = np.array([len(p) for p in paths], dtype=np.int64)
    rank = np.array([p[-1] if p else -1 for p in paths], dtype=np.int64)
    return Tree(parents=parents, depth=depth, rank=rank)


def chain_tree(length: int) -> Tree:
    """A root followed by ``length`` single-child nodes (no branching)."""
    return build_tree((1,) * length)


def graft_chain(tree: Tree, chain: Sequence[int]) -> Tree:
    """Add a chain of drafted tokens below the root, sharing the nodes it agrees with.

    Walks down from the root: while the chain's next token is already a child
    of the current node, it follows that child; from the first disagreement on
    it appends new nodes, each the child of the previous. New nodes come after
    their existing siblings in rank (they are tried last when sampling) and
    after every existing node in order, so the tree stays parents-first.

    Args:
        tree: a tree carrying tokens (``tokens[0]`` is the root's).
        chain: tokens drafted for the positions after the root, in order.

    Returns:
        The grown tree with tokens; ``tree`` itself when nothing is new.
    """
    assert tree.tokens is not None, "graft_chain needs a tree with tokens"
    parents, depth = list(tree.parents), list(tree.depth)
    rank, tokens = list(tree.rank), [int(t) for t in tree.tokens]
    kids = [list(k) for k in tree.children]
    node = 0
    for token in chain:
        match = next((c for c in kids[node] if tokens[c] == int(token)), None)
        if match is None:
            match = len(parents)
            parents.append(node)
            depth.append(depth[node] + 1)
            rank.append(len(kids[node]))
            tokens.append(int(token))
            kids[node].append(match)
            kids.append([])
        node = match
    if len(parents) == tree.size:
        return tree
    return Tree(parents=np.array(parents, dtype=np.int64), depth=np.array(depth, dtype=np.int64),
                rank=np.array(rank, dtype=np.int64), tokens=np.array(tokens, dtype=np.int64))


def draft_token_index(tree: Tree, top_k: int) -> np.ndarray:
    """Where each non-root node's token lies in the flattened stream top-k table.

    The table is ``(gamma, top_k)``: row ``d - 1`` holds stream ``d``'s best
    tokens, best first. Node ``i`` takes entry ``(depth_i - 1) * top_k + rank_i``.

    Returns:
        ``(N - 1,)`` int indices, one per non-root node in tree order.
    """
    depth, rank = tree.depth[1:], tree.rank[1:]
    if depth.size and rank.max() >= top_k:
        raise ValueError(f"tree needs top-{rank.max() + 1} drafts, table has {top_k}")
    return (depth - 1) * top_k + rank


def path_logprobs(tree: Tree, edge_logprobs: np.ndarray) -> np.ndarray:
    """Log-probability of each node's whole path from the root.

    Args:
        tree: the tree.
        edge_logprobs: ``(N,)``, ``log p(token_i | path to parent_i)`` from the
            early-exit head; entry 0 (the root) is ignored.

    Returns:
        ``(N,)``; the root scores 0 and each node adds its edge to its parent's.
    """
    scores = np.zeros(tree.size, dtype=np.float64)
    for i in np.argsort(tree.depth, kind="stable"):
        p = int(tree.parents[i])
        if p >= 0:
            scores[i] = scores[p] + float(edge_logprobs[i])
    return scores


def prune_tree(
    tree: Tree,
    edge_logprobs: np.ndarray,
    threshold: float,
    max_keep: Optional[int] = None,
) -> np.ndarray:
    """Choose the nodes that go on to the multi-stream layers.

    A node survives if its path probability (product of early-exit edge
    probabilities from the root) is at least ``threshold``. Path probabilities
    never grow along a path, so survivors form a sub-tree that contains the
    root. ``max_keep`` then keeps the best ones (ties go to the smaller index,
    which is the ancestor), which is again a sub-tree.

    Args:
        tree: the tree.
        edge_logprobs: ``(N,)`` early-exit log-probability of each edge.
        threshold: minimum path probability in ``[0, 1]``; 0 keeps everything.
        max_keep: optional cap on survivors, root included.

    Returns:
        Sorted ``(K,)`` indices of surviving nodes; always starts with 0.
    """
    scores = path_logprobs(tree, edge_logprobs)
    floor = -np.inf if threshold <= 0 else np.log(threshold)
    keep = scores >= floor
    keep[0] = True
    kept = np.nonzero(keep)[0]
    if max_keep is not None and kept.size > max_keep:
        order = sorted(kept.tolist(), key=lambda i: (-scores[i], i))
        kept = np.array(sorted(order[: max(1, max_keep)]), dtype=np.int64)
    return kept


def subtree(tree: Tree, kept: np.ndarray) -> Tree:
    """The tree restricted to ``kept`` (sorted indices, closed under ancestors)."""
    kept = np.asarray(kept, dtype=np.int64)
    new_index = -np.ones(tree.size, dtype=np.int64)
    new_index[kept] = np.arange(kept.size)
    old_parents = tree.parents[kept]
    parents = np.where(old_parents >= 0, new_index[np.maximum(old_parents, 0)], -1)
    assert (parents[1:] >= 0).all(), "kept nodes must include their ancestors"
    tokens = None if tree.tokens is None else tree.tokens[kept]
    return Tree(parents=parents, depth=tree.depth[kept], rank=tree.rank[kept], tokens=tokens)


