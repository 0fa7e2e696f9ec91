"""The decode loop: prefill, then one forward per step (verify + emit + draft).

``decode`` yields one ``Step`` per forward with the tokens that forward emitted.
Per step the host waits once (for the argmax / acceptance inputs of the tree);
the next tree's tokens are gathered on the device and never visit the host
before the next forward is queued.

Where drafts come from is the drafter's business (``drafters``): it proposes
the next forward's tree (topology, rows, tokens) and reads the forward's output
once the step is accepted. Which drafted tokens are kept is ``verify``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import overlap
from .cache import cache_state, commit, make_cache
from .config import ContextOverflowError  # noqa: F401 (raised here; importable from here too)
from .drafters import Drafter, make_drafter
from .forward import ForwardOutput, forward, logits
from .masks import chain_rows
from .model import SpecStreamModel
from .tree import subtree
from .verify import SamplingParams, accept_greedy, accept_sampling, target_logits


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


def _prefill(model, prompt, cache, step_size, speculative,
             streams: Optional[int] = None) -> ForwardOutput:
    """Run the prompt in chunks, committing each; return the last chunk's output.

    Only the last prompt position runs stream rows (its streams draft the first
    tree), and only when the drafter reads streams: no main row sees a stream.
    """
    n = len(prompt)
    start = 0
    while True:
        end = min(n, start + step_size)
        size = end - start
        nodes = np.array([size - 1]) if speculative and end == n else None
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
    drafter: Optional[Drafter] = None,
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
        drafter: where drafts come from (``drafters.make_drafter``); default:
            the streams with the checkpoint's tree for this backend.
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
    if drafter is None:
        drafter = make_drafter(model)
    if overlap.eligible(model, drafter, sampling.greedy):  # the same steps, host work hidden
        yield from _decode_overlapped(model, prompt, max_tokens, drafter.shape.size - 1,
                                      prefill_step_size)
        return

    cache = make_cache(model.num_layers)
    history = list(prompt)
    # A drafter reads streams 1..stream_logits_depth; no main row sees a stream,
    # so the forwards run only those (``forward``'s ``streams``).
    streams = max(drafter.stream_logits_depth, 1)
    out = _prefill(model, history, cache, prefill_step_size, drafter.uses_streams, streams)
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


def _decode_overlapped(model: SpecStreamModel, prompt: Sequence[int], max_tokens: int,
                       depth: int, prefill_step_size: int) -> Iterator[Step]:
    """``decode``'s steps for greedy chain drafting, each queued before the last is
    read (``overlap``): the same tokens and steps. One step beyond the last is
    computed and dropped, as in mlx-lm."""
    cache = make_cache(model.num_layers)
    out = _prefill(model, list(prompt), cache, prefill_step_size, True, depth)
    both = logits(model, mx.concatenate([out.main_hidden[-1:], out.stream_hidden[0]]))  # (1 + d, V)
    best = mx.argmax(both, axis=-1).astype(mx.int32)  # root, then the first drafts
    yield Step(tokens=[best[0].item()], accepted=0, tree_size=0, prefill=True)
    emitted = 1
    chain = overlap.ChainDecoder(model, depth, cache)
    pending = chain.queue(best) if emitted < max_tokens else None
    while pending is not None:
        ahead = None if chain.crowded() else chain.queue(pending.tokens)
        tokens = chain.read(pending)
        emitted += len(tokens)
        yield Step(tokens=tokens, accepted=len(tokens) - 1, tree_size=chain.m)
        if emitted >= max_tokens:
            return
        if ahead is None:  # drained: nothing is queued, so the slots can move
            chain.compact()
            ahead = chain.queue(pending.tokens)
        pending = ahead
