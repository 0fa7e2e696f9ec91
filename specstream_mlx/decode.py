"""The decode loop: prefill, then one forward per step (verify + emit + draft).

``decode`` yields one ``Step`` per forward with the tokens that forward emitted.
Per step the host waits once (for the argmax / acceptance inputs of the tree);
the next tree's tokens are gathered on the device and never visit the host
before the next forward is queued.

Where drafts come from is pluggable: a *drafter* proposes the next forward's
tree (topology, rows, tokens) and may read the forward's output once the step
is accepted. ``StreamDrafter`` (the speculative streams, the default) and
``PlainDrafter`` (no drafts) live here; ``pld.PromptLookupDrafter`` drafts from
n-grams of the prompt and output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Sequence

import mlx.core as mx
import numpy as np

from .cache import cache_state, commit, make_cache
from .forward import ForwardOutput, PruneSettings, forward, logits
from .masks import Rows, chain_rows
from .model import SpecStreamModel
from .tree import Tree, accept_greedy, build_tree, draft_token_index, subtree
from .verify import SamplingParams, accept_sampling, target_logits


class ContextOverflowError(ValueError):
    """The prompt (plus the requested tokens) does not fit the model's context."""


@dataclass(frozen=True)
class TreeSettings:
    """Shape of the draft tree used at every step.

    Attributes:
        widths: children per node at each depth; ``len(widths) <= gamma``.
        max_nodes: cap on tree rows, root included.
        prune_threshold: early-exit pruning threshold (``None``: off).
        prune_max_keep: cap on rows kept by pruning.
    """

    widths: tuple = (3, 2, 1)
    max_nodes: Optional[int] = 16
    prune_threshold: Optional[float] = None
    prune_max_keep: Optional[int] = None


@dataclass
class Step:
    """What one forward produced.

    Attributes:
        tokens: emitted tokens in order (accepted drafts, then the new root).
        accepted: number of accepted draft tokens (depth reached in the tree).
        tree_size: rows verified in this forward (0 for the prefill).
        prefill: this is the prompt's forward (its token comes from the prompt).
    """

    tokens: list
    accepted: int
    tree_size: int
    prefill: bool = False


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


def tree_rows(tree: Tree) -> Rows:
    """Rows of a tree forward: every node drafts through its streams."""
    return Rows(
        depth=tree.depth,
        ancestors=tree.mask,
        stream_nodes=np.arange(tree.size, dtype=np.int64),
    )


def _choose(row_logits: mx.array, sampling: SamplingParams, excluded=()) -> mx.array:
    """Next token from one row of logits: argmax, or a sample from the target."""
    if sampling.greedy:
        return mx.argmax(row_logits, axis=-1)
    target = target_logits(row_logits, sampling)
    if excluded:
        target = target.at[mx.array(list(excluded))].add(-mx.inf)
    return mx.random.categorical(target)


#: Below this many rows, one LM-head matmul over the main rows *and* every
#: node's stream rows costs about what the main rows alone cost (the vocabulary
#: projection is bound by reading its weights), so the draft logits come free
#: instead of a second pass over the LM head after the step is accepted.
FUSED_HEAD_ROWS = 32


def _head(model: SpecStreamModel, out: ForwardOutput, depth: int):
    """Main logits ``(K, V)`` and, when cheap, every node's stream logits ``(S, depth, V)``."""
    if out.stream_hidden is None or depth == 0:
        return logits(model, out.main_hidden), None
    main, streams = out.main_hidden, out.stream_hidden[:, :depth]  # (K, H), (S, depth, H)
    if main.shape[0] + streams.shape[0] * depth > FUSED_HEAD_ROWS:
        return logits(model, main), None
    both = logits(model, mx.concatenate([main, streams.reshape(-1, main.shape[-1])]))
    return both[: main.shape[0]], both[main.shape[0] :].reshape(streams.shape[0], depth, -1)


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

    def __init__(self, model: SpecStreamModel, tree: TreeSettings) -> None:
        self.model = model
        self.depth = self.max_depth = min(len(tree.widths), model.config.gamma)
        self.stream_logits_depth = self.depth
        self.shape = build_tree(tuple(tree.widths[: self.depth]), tree.max_nodes)
        self.top_k = int(self.shape.rank.max()) + 1 if self.shape.size > 1 else 1
        self.index = mx.array(draft_token_index(self.shape, self.top_k))
        self.rows = tree_rows(self.shape)
        self.prune = None
        if tree.prune_threshold is not None:
            self.prune = PruneSettings(tree.prune_threshold, tree.prune_max_keep)
        self.table = None

    def propose(self, history: List[int], budget: int) -> Draft:
        return Draft(self.shape, self.rows, self.table[self.index], self.prune)

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        slot = int(out.stream_slot[node])
        scores = None if stream_logits is None else stream_logits[slot]
        self.table = _draft_table(self.model, out.stream_hidden[slot], self.depth, self.top_k,
                                  scores)


class PlainDrafter:
    """No drafts: one token per forward through the same code (the baseline)."""

    uses_streams = False
    max_depth = 0
    stream_logits_depth = 0

    def __init__(self, model: SpecStreamModel) -> None:
        shared = model.config.mode == "shared"  # main rows see their own streams
        self.draft = Draft(build_tree(()), chain_rows(1, [0] if shared else None),
                           mx.zeros((0,), mx.int32))

    def propose(self, history: List[int], budget: int) -> Draft:
        return self.draft

    def observe(self, out: ForwardOutput, node: int, stream_logits=None) -> None:
        pass


def _prefill(model, prompt, cache, step_size, shared, speculative,
             streams: Optional[int] = None) -> ForwardOutput:
    """Run the prompt in chunks, committing each; return the last chunk's output."""
    n = len(prompt)
    start = 0
    while True:
        end = min(n, start + step_size)
        size = end - start
        if shared:
            nodes = np.arange(size)
        elif speculative and end == n:
            nodes = np.array([size - 1])
        else:
            nodes = None
        out = forward(model, mx.array(prompt[start:end]), chain_rows(size, nodes), cache,
                      streams=streams)
        commit(cache, np.arange(size), None, model.num_layers)
        if end == n:
            return out
        mx.eval(cache_state(cache))
        start = end


def decode(
    model: SpecStreamModel,
    prompt: Sequence[int],
    max_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    tree: TreeSettings = TreeSettings(),
    speculative: bool = True,
    prefill_step_size: int = 512,
    max_context: Optional[int] = None,
    drafter: Optional[Drafter] = None,
) -> Iterator[Step]:
    """Generate tokens with Speculative Streaming (or plain decoding).

    Args:
        model: the Speculative Streaming model.
        prompt: prompt token ids (non-empty).
        max_tokens: stop once this many tokens have been emitted (the last
            step may emit more; callers truncate).
        sampling: greedy or sampling settings.
        tree: draft tree settings (for the default stream drafter).
        speculative: ``False`` decodes one token per forward through the same
            code (the ``--no-spec`` baseline).
        prefill_step_size: prompt chunk size.
        max_context: the model's context length, if known.
        drafter: where drafts come from; default: the streams with ``tree``
            (``PlainDrafter`` when ``speculative`` is ``False``).

    Yields:
        One ``Step`` per forward, the prefill first.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_context is not None and len(prompt) + max_tokens > max_context:
        raise ContextOverflowError(
            f"prompt ({len(prompt)} tokens) + max tokens ({max_tokens}) exceeds the "
            f"model's context of {max_context} tokens: shorten the prompt or lower --max-tokens"
        )
    if drafter is None:
        drafter = StreamDrafter(model, tree) if speculative else PlainDrafter(model)
    shared = model.config.mode == "shared"

    cache = make_cache(model.num_layers)
    history = list(prompt)
    # A drafter reads streams 1..stream_logits_depth; in lossless mode no main row
    # sees a stream, so the forwards run only those (``forward``'s ``streams``).
    streams = None if shared else max(drafter.stream_logits_depth, 1)
    out = _prefill(model, history, cache, prefill_step_size, shared, drafter.uses_streams,
                   streams)
    root = _choose(logits(model, out.main_hidden[-1]), sampling)
    drafter.observe(out, out.main_hidden.shape[0] - 1)
    mx.eval(root)
    history.append(root.item())
    emitted = 1
    yield Step(tokens=[history[-1]], accepted=0, tree_size=0, prefill=True)

    while emitted < max_tokens:
        draft = drafter.propose(history, max_tokens - emitted)
        tokens = root.reshape(1)
        if draft.tree.size > 1:
            tokens = mx.concatenate([tokens, draft.tokens.astype(tokens.dtype)])
        out = forward(model, tokens, draft.rows, cache, tree=draft.tree, prune=draft.prune,
                      streams=streams)
        kept = out.kept
        topo = draft.tree if kept is None else subtree(draft.tree, kept)
        step_logits, stream_logits = _head(model, out, drafter.stream_logits_depth)  # (K, V), (S, depth, V) or None
        if kept is not None:
            tokens = tokens[mx.array(kept)]
        if sampling.greedy:
            argmax = mx.argmax(step_logits, axis=-1)
            mx.eval(argmax, tokens)
            host_tokens = np.array(tokens)
            path = accept_greedy(topo.with_tokens(host_tokens), np.array(argmax))
            root = argmax[path[-1]]
        else:
            probs = mx.softmax(target_logits(step_logits, sampling), axis=-1)
            parents = mx.array(np.maximum(topo.parents, 0))
            child_probs = probs[parents, tokens]  # p_parent(token) per node
            uniforms = mx.random.uniform(shape=(topo.size,))
            mx.eval(child_probs, uniforms, tokens)
            host_tokens = np.array(tokens)
            path, excluded = accept_sampling(
                topo.with_tokens(host_tokens), np.array(child_probs), np.array(uniforms)
            )
            root = _choose(step_logits[path[-1]], sampling, excluded)
        original = path if kept is None else kept[np.array(path)]
        commit(cache, original, kept, model.first_stream_layer)
        drafter.observe(out, path[-1], stream_logits)
        mx.eval(root)
        step_tokens = [int(t) for t in host_tokens[path[1:]]] + [root.item()]
        history.extend(step_tokens)
        emitted += len(step_tokens)
        yield Step(tokens=step_tokens, accepted=len(path) - 1, tree_size=topo.size)
