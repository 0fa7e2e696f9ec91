"""Drafters: where the next forward's draft tree comes from.

A *drafter* proposes the tree that the next forward verifies (topology, rows,
tokens) and reads that forward's output once its step is accepted. The decode
loop (``decode.decode``) is the same for all of them; verification does not
depend on where drafts come from, so every drafter here is lossless.

* ``StreamDrafter``: the speculative streams (the method): top-k tokens of
  each stream of the last accepted node, arranged as a fixed tree.
* ``MedusaDrafter``: the peer method, Medusa heads on the last hidden state
  (``heads.py``), arranged in the same trees.
* ``EagleDrafter``: the other peer, an EAGLE-style one-layer head that drafts
  features autoregressively (``eagle.py``), arranged in the same trees.
* ``PlainDrafter``: no drafts; one token per forward (the ``--no-spec`` baseline).
* ``PromptLookupDrafter``: a chain copied from earlier text (prompt lookup
  decoding, Saxena 2023; ``prompt_lookup_num_tokens`` in transformers). It
  costs no model work, so it wins when the output copies from the prompt.
* ``StreamLookupDrafter``: the streams' tree with a lookup chain grafted below
  the root, verified in one forward.

``make_drafter`` is the one factory the API, CLI, bench, server and eval use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import mlx.core as mx
import numpy as np

from .config import PruneSettings, TreeSettings, tree_settings
from .forward import ForwardOutput, logits
from .masks import Rows, chain_rows, tree_rows
from .model import SpecStreamModel
from .tree import Tree, build_tree, chain_tree, draft_token_index, graft_chain


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for the next forward.

    Attributes:
        tree: the topology (node 0 is the root, the token just emitted).
        rows: the forward's rows for that topology (``tree_rows``, or
            ``chain_rows`` for a chain).
        tokens: ``(tree.size - 1,)`` drafted tokens of nodes ``1..``, an
            ``mx.array`` (it may stay on the device).
        prune: early-exit pruning of the tree, or ``None``.
    """

    tree: Tree
    rows: Rows
    tokens: mx.array
    prune: Optional[PruneSettings] = None


class Drafter(Protocol):
    """Source of draft trees for ``decode``.

    Attributes:
        uses_streams: the prefill's last row must produce stream rows.
        max_depth: deepest draft it can propose (for acceptance statistics).
        stream_logits_depth: how many streams' logits ``observe`` reads (0: none).
    """

    uses_streams: bool
    max_depth: int
    stream_logits_depth: int

    def propose(self, history: List[int], budget: int) -> Draft:
        """The draft for the next forward.

        Args:
            history: prompt plus every emitted token; the last is the root.
            budget: tokens still wanted after the root (drafts beyond it are wasted).
        """

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        """See the forward that produced ``node``'s row (index into ``out``'s main rows).

        ``stream_logits`` (``(S, depth, V)``), when given, are every stream
        row's logits, already computed with the main rows'.
        """


def _draft_table(model: SpecStreamModel, streams: mx.array, depth: int, top_k: int,
                 scores: Optional[mx.array] = None) -> mx.array:
    """Best ``top_k`` tokens of streams ``1..depth``, best first. ``(gamma, H) -> (depth*top_k,)``.

    ``scores`` (``(depth, V)``) are the streams' logits when already computed.
    """
    if scores is None:
        scores = logits(model, streams[:depth])  # (depth, V)
    top = mx.argpartition(-scores, kth=top_k - 1, axis=-1)[:, :top_k]
    order = mx.argsort(-mx.take_along_axis(scores, top, axis=-1), axis=-1)
    return mx.take_along_axis(top, order, axis=-1).reshape(-1)


class StreamDrafter:
    """Drafts from the speculative streams: a fixed tree, top-k tokens per stream."""

    uses_streams = True

    def __init__(self, model: SpecStreamModel, tree: TreeSettings, depth: Optional[int] = None) -> None:
        self.model = model
        self.depth = self.max_depth = min(len(tree.widths), model.config.gamma if depth is None else depth)
        self.stream_logits_depth = self.depth
        self.shape = build_tree(tuple(tree.widths[: self.depth]), tree.max_nodes)
        self.top_k = int(self.shape.rank.max()) + 1 if self.shape.size > 1 else 1
        self.index = mx.array(draft_token_index(self.shape, self.top_k))
        self.rows = tree_rows(self.shape)
        self.prune = tree.prune
        self.table = None

    def propose(self, history: List[int], budget: int) -> Draft:
        return Draft(self.shape, self.rows, self.table[self.index], self.prune)

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        slot = int(out.stream_slot[node])
        scores = None if stream_logits is None else stream_logits[slot]
        self.table = _draft_table(self.model, out.stream_hidden[slot], self.depth, self.top_k,
                                  scores)


class MedusaDrafter(StreamDrafter):
    """Drafts from Medusa heads (``heads.py``): the same trees as the streams, top-k
    tokens of head ``k`` at depth ``k``, read off the last accepted node's final hidden
    state. No stream rows run; the forward holds the tree's main rows only."""

    uses_streams = False

    def __init__(self, model: SpecStreamModel, tree: TreeSettings) -> None:
        heads = model.medusa
        if heads is None:
            raise ValueError("this checkpoint has no Medusa heads (medusa.json, medusa.safetensors): "
                             "train them with `specstream-mlx train-heads` or draft with the streams")
        self.heads = heads
        super().__init__(model, tree, depth=heads.config.num_heads)
        self.stream_logits_depth = 0
        self.rows = tree_rows(self.shape, streams=False)

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        scores = self.heads.logits(self.model.base, out.main_hidden[node])[: self.depth]  # (depth, V)
        self.table = _draft_table(self.model, None, self.depth, self.top_k, scores)


class EagleDrafter:
    """Drafts with an EAGLE-style head (``eagle.py``): depth by depth, each node's children
    are the top tokens of the head's prediction *given that node's token*.

    The head keeps its own one-layer cache of (true feature, next token) pairs of the
    accepted text. Per step: the pairs of the path the last forward accepted are
    committed (their features are the base model's, read from that forward), the last
    one predicts the root's feature, and each further depth runs the head once on all
    drafted nodes so far (pending rows, a tree mask) to predict theirs. Everything stays
    on the device; the topology is ``tree.build_tree``'s, so verification is unchanged.
    """

    uses_streams = False
    stream_logits_depth = 0

    def __init__(self, model: SpecStreamModel, tree: TreeSettings) -> None:
        from .cache import LayerCache

        if model.eagle is None:
            raise ValueError("this checkpoint has no EAGLE head (eagle.json, eagle.safetensors): train "
                             "one with `specstream-mlx train-heads --kind eagle` or draft with the streams")
        self.model, self.head = model, model.eagle
        self.shape = build_tree(tuple(tree.widths), tree.max_nodes)
        self.max_depth = self.shape.max_depth
        self.rows = tree_rows(self.shape, streams=False)
        self.cache = LayerCache()
        self.top_k = int(self.shape.rank.max()) + 1 if self.shape.size > 1 else 1
        self.features = None  # (n, H): base features of the accepted path, root's parent last
        self.last_shape = None  # the topology the observed forward verified (None: a prompt chunk)
        self.levels = self._levels(self.shape)

    @staticmethod
    def _levels(shape) -> list:
        """Per depth ``d``, what ``propose`` needs, fixed by the topology: the parents whose
        children sit at ``d`` (each child's row among them and its rank), and for ``d`` below
        the deepest, the head run over every node of depth ``1..d`` (nodes, their parents, the
        tree mask among them, RoPE positions)."""
        levels = []
        for depth in range(1, shape.max_depth + 1):
            level = [v for v in range(shape.size) if shape.depth[v] == depth]
            parents = sorted({int(shape.parents[v]) for v in level})
            where = {p: i for i, p in enumerate(parents)}
            nodes = [v for v in range(1, shape.size) if shape.depth[v] <= depth]
            index = {v: i for i, v in enumerate(nodes)}
            block = np.zeros((len(nodes), len(nodes)), dtype=bool)
            for i, v in enumerate(nodes):
                u = v
                while u > 0:
                    block[i, index[u]] = True
                    u = int(shape.parents[u])
            levels.append({
                "parents": parents,
                "children": [(v, where[int(shape.parents[v])], int(shape.rank[v])) for v in level],
                "nodes": nodes,
                "node_parents": [int(shape.parents[v]) for v in nodes],
                "block": block,
                "positions": np.array([int(shape.depth[v]) - 1 for v in nodes]),
            })
        return levels

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        assert out.kept is None, "EAGLE drafts are not pruned"
        if self.last_shape is None:  # the prompt: every row up to ``node``
            path = np.arange(node + 1)
        else:
            path, v = [], node
            while v >= 0:
                path.append(v)
                v = int(self.last_shape.parents[v])
            path = np.array(path[::-1])
        self.features = out.main_hidden[mx.array(path)]

    def _run(self, features, tokens, mask, positions, commit: bool) -> mx.array:
        out = self.head(self.model.base, self.model.family, features[None], tokens[None], mask,
                        self.cache, positions)[0]
        if commit:
            self.cache.commit(np.arange(tokens.shape[0]))
        return out

    def propose(self, history: List[int], budget: int) -> Draft:
        n = self.features.shape[0]
        # (f_i, x_{i+1}) for the accepted positions: the last pair predicts the root's feature.
        nxt = mx.array(np.asarray(history[-n:], np.int32))
        length = self.cache.length
        causal = np.tril(np.ones((n, n), dtype=bool))
        mask = mx.array(np.concatenate([np.ones((n, length), bool), causal], axis=1))
        predicted = self._run(self.features, nxt, mask, np.arange(n), commit=True)[-1:]  # (1, H)
        shape = self.shape
        self.last_shape = shape
        if shape.size == 1:
            return Draft(shape, self.rows, mx.zeros((0,), mx.int32))
        tokens = [None] * shape.size
        feats = [None] * shape.size  # predicted feature at each node (what its children come from)
        feats[0] = predicted[0]
        for depth, level in enumerate(self.levels, start=1):
            scores = self.head.logits(self.model.base, mx.stack([feats[p] for p in level["parents"]]))  # (P, V)
            top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[:, : self.top_k]
            order = mx.argsort(-mx.take_along_axis(scores, top, axis=-1), axis=-1)
            best = mx.take_along_axis(top, order, axis=-1)  # (P, top_k), best first
            for v, row, rank in level["children"]:
                tokens[v] = best[row, rank]
            if depth == shape.max_depth:
                break
            # one head run over every drafted node so far (depth 1..depth): (f_parent, token)
            nodes, block = level["nodes"], level["block"]
            mask = mx.array(np.concatenate([np.ones((len(nodes), self.cache.length), bool), block], axis=1))
            out = self._run(mx.stack([feats[p] for p in level["node_parents"]]),
                            mx.stack([tokens[v] for v in nodes]).astype(mx.int32), mask,
                            level["positions"], commit=False)
            for i, v in enumerate(nodes):
                feats[v] = out[i]
        return Draft(shape, self.rows, mx.stack(tokens[1:]).astype(mx.int32))


class PlainDrafter:
    """No drafts: one token per forward through the same code (the baseline)."""

    uses_streams = False
    max_depth = 0
    stream_logits_depth = 0

    def __init__(self, model: SpecStreamModel) -> None:
        self.draft = Draft(build_tree(()), chain_rows(1), mx.zeros((0,), mx.int32))

    def propose(self, history: List[int], budget: int) -> Draft:
        return self.draft

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        pass


def find_draft(history: Sequence[int], max_ngram: int = 3, min_ngram: int = 1,
               num_tokens: int = 4) -> List[int]:
    """Tokens that followed the last earlier occurrence of the history's tail.

    Longer n-grams are tried first; for one ``n`` the most recent earlier match
    wins (it is the likeliest to continue the same way). The tail itself (the
    last ``n`` tokens) is not a match.

    Args:
        history: token ids, oldest first (prompt, then output).
        max_ngram, min_ngram: n-gram sizes to try, longest first (``>= 1``).
        num_tokens: at most this many draft tokens.

    Returns:
        Up to ``num_tokens`` draft tokens; empty when nothing matches.

    Raises:
        ValueError: on sizes below 1 or ``min_ngram > max_ngram``.
    """
    if min_ngram < 1 or max_ngram < min_ngram or num_tokens < 0:
        raise ValueError(
            f"PLD needs 1 <= min n-gram <= max n-gram and num tokens >= 0, got "
            f"{min_ngram}, {max_ngram}, {num_tokens}"
        )
    length = len(history)
    if num_tokens == 0 or length < 2:
        return []
    seq = np.asarray(history, dtype=np.int64)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = seq[length - n:]
        # Candidate starts 0 .. length-n-1: windows that end before the tail starts
        # can overlap it, but never are it.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)
        hits = np.nonzero((windows == tail).all(axis=1))[0]
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in seq[start : start + num_tokens]]
    return []


class PromptLookupDrafter:
    """A ``Drafter`` that proposes a chain from ``find_draft``.

    Args:
        model: the model (unused: a lookup chain runs no stream rows).
        max_ngram, min_ngram, num_tokens: as in ``find_draft``.
    """

    uses_streams = False
    stream_logits_depth = 0

    def __init__(self, model, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 4):
        find_draft([], max_ngram, min_ngram, num_tokens)  # validates the sizes
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth = num_tokens

    def chain(self, history: List[int], budget: int) -> List[int]:
        """The lookup draft for the next step, within ``budget`` (tokens still wanted)."""
        return find_draft(history, self.max_ngram, self.min_ngram,
                          min(self.max_depth, max(budget - 1, 0)))

    def propose(self, history: List[int], budget: int) -> Draft:
        drafts = self.chain(history, budget)
        size = len(drafts) + 1
        rows = chain_rows(size)
        return Draft(chain_tree(len(drafts)), rows, mx.array(np.array(drafts, dtype=np.int32)))

    def observe(self, out, node: int, stream_logits=None) -> None:
        pass


class StreamLookupDrafter:
    """A ``Drafter`` whose tree is the streams' tree plus a prompt-lookup chain.

    Each step drafts the streams' tree (as ``StreamDrafter`` with ``tree``)
    and, when ``find_draft`` finds an earlier occurrence of the text's tail,
    grafts the tokens that followed it below the root (``tree.graft_chain``:
    where the lookup agrees with a stream guess the nodes are shared). One
    forward verifies both; every node gets stream rows, so whichever path is
    accepted, its last node's streams draft the next tree. The streams cover
    free text, the lookup covers text copied from the prompt (summaries,
    quotes, code edits), and a step keeps the longer accepted run. Without a
    lookup match a step is exactly ``StreamDrafter``'s.

    Args:
        model: the model.
        tree: the streams' tree settings (early-exit pruning applies only to
            steps without a grafted chain).
        max_ngram, min_ngram, num_tokens: as in ``find_draft``.
    """

    uses_streams = True

    def __init__(self, model, tree: TreeSettings, max_ngram: int = 3, min_ngram: int = 1,
                 num_tokens: int = 4):
        self.lookup = PromptLookupDrafter(model, max_ngram, min_ngram, num_tokens)
        self.streams = StreamDrafter(model, tree)
        self.stream_logits_depth = self.streams.stream_logits_depth
        self.max_depth = max(self.streams.max_depth, num_tokens)

    def propose(self, history: List[int], budget: int) -> Draft:
        draft = self.streams.propose(history, budget)
        chain = self.lookup.chain(history, budget)
        if not chain:
            return draft
        # The streams' tokens are needed on the host to share the agreeing nodes.
        tokens = np.concatenate([[history[-1]], np.array(draft.tokens, dtype=np.int64)])
        tree = graft_chain(draft.tree.with_tokens(tokens), chain)
        if tree.size == draft.tree.size:
            return draft
        return Draft(tree, tree_rows(tree), mx.array(tree.tokens[1:].astype(np.int32)))

    def observe(self, out, node: int, stream_logits=None) -> None:
        self.streams.observe(out, node, stream_logits)


def make_drafter(
    model: SpecStreamModel,
    tree: Optional[TreeSettings] = None,
    lookup: int = 0,
    speculative: bool = True,
    lookup_ngram: int = 3,
    source: str = "streams",
):
    """The drafter for a generation: the one place that maps options to a drafter.

    Args:
        model: the model (its checkpoint gives the default tree).
        tree: the streams' tree; ``None``: the checkpoint's default for this
            backend (``config.tree_settings``), cut to the model's ``gamma``.
        lookup: also draft up to this many prompt-lookup tokens per step (0: off).
        speculative: draft with the streams. ``False`` with ``lookup == 0`` is
            plain decoding (one token per forward); ``False`` with ``lookup``
            is prompt lookup alone.
        lookup_ngram: longest n-gram the lookup matches.
        source: ``"streams"`` (the method), ``"medusa"`` (the checkpoint's Medusa
            heads, ``heads.py``) or ``"eagle"`` (its EAGLE-style head, ``eagle.py``): the
            peer methods, with the same trees and verification.

    Returns:
        ``StreamDrafter``, ``StreamLookupDrafter``, ``PromptLookupDrafter`` or
        ``PlainDrafter``. A drafter keeps per-generation state: reuse it only
        for one generation at a time.

    Raises:
        ValueError: ``lookup < 0`` or ``lookup_ngram < 1``.
    """
    if lookup < 0:
        raise ValueError(f"lookup takes a number of tokens >= 0, got {lookup}")
    if lookup_ngram < 1:
        raise ValueError(f"the lookup n-gram must be >= 1, got {lookup_ngram}")
    if source not in ("streams", "medusa", "eagle"):
        raise ValueError(f"source must be streams, medusa or eagle, got {source!r}")
    if not speculative:
        if lookup:
            return PromptLookupDrafter(model, max_ngram=lookup_ngram, num_tokens=lookup)
        return PlainDrafter(model)
    if source in ("medusa", "eagle"):
        if lookup:
            raise ValueError(f"lookup drafts beside the streams' tree only; draft with {source} alone")
        tree = tree_settings(model.config) if tree is None else tree
        return MedusaDrafter(model, tree) if source == "medusa" else EagleDrafter(model, tree)
    tree = tree_settings(model.config) if tree is None else tree.cut(model.config.gamma)
    if lookup:
        return StreamLookupDrafter(model, tree, max_ngram=lookup_ngram, num_tokens=lookup)
    return StreamDrafter(model, tree)
