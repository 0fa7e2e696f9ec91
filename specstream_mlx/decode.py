"""The decode loop: prefill, then one forward per step (verify + emit + draft).

``decode`` yields one ``Step`` per forward with the tokens that forward emitted.
Per step the host waits once (for the argmax / acceptance inputs of the tree);
the next tree's tokens are gathered on the device and never visit the host
before the next forward is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

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


def _draft_table(model: SpecStreamModel, streams: mx.array, depth: int, top_k: int) -> mx.array:
    """Best ``top_k`` tokens of streams ``1..depth``, best first. ``(gamma, H) -> (depth*top_k,)``."""
    scores = logits(model, streams[:depth])  # (depth, V)
    top = mx.argpartition(-scores, kth=top_k - 1, axis=-1)[:, :top_k]
    order = mx.argsort(-mx.take_along_axis(scores, top, axis=-1), axis=-1)
    return mx.take_along_axis(top, order, axis=-1).reshape(-1)


def _prefill(model, prompt, cache, step_size, shared, speculative) -> ForwardOutput:
    """Run the prompt in chunks, committing each; return the last chunk's output."""
    n = len(prompt)
    start = 0
    while True:
        end = min(n, start + step_size)
        size = end - start
        if shared:
            streams = np.arange(size)
        elif speculative and end == n:
            streams = np.array([size - 1])
        else:
            streams = None
        out = forward(model, mx.array(prompt[start:end]), chain_rows(size, streams), cache)
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
) -> Iterator[Step]:
    """Generate tokens with Speculative Streaming (or plain decoding).

    Args:
        model: the Speculative Streaming model.
        prompt: prompt token ids (non-empty).
        max_tokens: stop once this many tokens have been emitted (the last
            step may emit more; callers truncate).
        sampling: greedy or sampling settings.
        tree: draft tree settings.
        speculative: ``False`` decodes one token per forward through the same
            code (the ``--no-spec`` baseline).
        prefill_step_size: prompt chunk size.
        max_context: the model's context length, if known.

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
    config = model.config
    shared = config.mode == "shared"
    depth = min(len(tree.widths), config.gamma)
    shape = build_tree(tuple(tree.widths[:depth]), tree.max_nodes)
    top_k = int(shape.rank.max()) + 1 if shape.size > 1 else 1
    draft_index = mx.array(draft_token_index(shape, top_k))
    rows = tree_rows(shape) if speculative else chain_rows(1, [0] if shared else None)
    prune = None
    if speculative and tree.prune_threshold is not None:
        prune = PruneSettings(tree.prune_threshold, tree.prune_max_keep)

    cache = make_cache(model.num_layers)
    out = _prefill(model, list(prompt), cache, prefill_step_size, shared, speculative)
    root = _choose(logits(model, out.main_hidden[-1]), sampling)
    if speculative:
        table = _draft_table(model, out.stream_hidden[-1], depth, top_k)
    mx.eval(root)
    emitted = 1
    yield Step(tokens=[root.item()], accepted=0, tree_size=0, prefill=True)

    while emitted < max_tokens:
        if speculative:
            tokens = mx.concatenate([root.reshape(1), table[draft_index]])
        else:
            tokens = root.reshape(1)
        out = forward(model, tokens, rows, cache, tree=shape, prune=prune)
        kept = out.kept
        topo = shape if kept is None else subtree(shape, kept)
        if not speculative:
            topo = build_tree(())
        step_logits = logits(model, out.main_hidden)  # (K, V)
        if kept is not None:
            tokens = tokens[mx.array(kept)]
        if sampling.greedy:
            argmax = mx.argmax(step_logits, axis=-1)
            mx.eval(argmax, tokens)
            path = accept_greedy(topo.with_tokens(np.array(tokens)), np.array(argmax))
            root = argmax[path[-1]]
        else:
            probs = mx.softmax(target_logits(step_logits, sampling), axis=-1)
            parents = mx.array(np.maximum(topo.parents, 0))
            child_probs = probs[parents, tokens]  # p_parent(token) per node
            uniforms = mx.random.uniform(shape=(topo.size,))
            mx.eval(child_probs, uniforms, tokens)
            path, excluded = accept_sampling(
                topo.with_tokens(np.array(tokens)), np.array(child_probs), np.array(uniforms)
            )
            root = _choose(step_logits[path[-1]], sampling, excluded)
        original = path if kept is None else kept[np.array(path)]
        commit(cache, original, kept, model.first_stream_layer)
        if speculative:
            slot = int(out.stream_slot[path[-1]])
            table = _draft_table(model, out.stream_hidden[slot], depth, top_k)
        mx.eval(root)
        accepted_tokens = [int(t) for t in np.array(tokens)[path[1:]]] if len(path) > 1 else []
        step_tokens = accepted_tokens + [root.item()]
        emitted += len(step_tokens)
        yield Step(tokens=step_tokens, accepted=len(path) - 1, tree_size=topo.size)
