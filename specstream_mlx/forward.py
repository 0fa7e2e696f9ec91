"""One multi-stream forward: verify a tree (or a chunk), emit, and draft.

Rows of the lower ``N - Ns`` layers are the main rows only. At the input of
layer ``N - Ns`` the tree may be pruned (early exit), then each row in
``rows.stream_nodes`` gets ``gamma`` stream rows ``h + P[j]`` that run through
the top ``Ns`` layers next to the main rows, under the MSA mask (``masks``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .attention import layer_mask
from .cache import LayerCache, StepView, rope_offset
from .config import PruneSettings
from .families import embed, lm_head
from .masks import Rows, msa_block, row_positions
from .model import SpecStreamModel
from .tree import Tree, prune_tree
from .treedesc import describe


@dataclass
class ForwardOutput:
    """Final-norm hidden states of one forward (logits are computed on demand).

    Attributes:
        main_hidden: ``(K, H)`` for the main rows that reached the top layers.
        stream_hidden: ``(S, streams, H)`` for the stream rows (``streams``: the
            forward's, ``gamma`` by default), or ``None``.
        kept: sorted indices of the main rows kept by pruning, or ``None`` (all).
        stream_slot: ``(K,)`` slot of each kept row in ``stream_hidden`` (-1: none).
    """

    main_hidden: mx.array
    stream_hidden: Optional[mx.array]
    kept: Optional[np.ndarray]
    stream_slot: np.ndarray


def logits(model: SpecStreamModel, hidden: mx.array) -> mx.array:
    """LM-head logits of final-norm hidden states. ``(..., H) -> (..., V)``."""
    return lm_head(model.base, hidden)


def run_layers(model, h, layer_ids, block, positions, is_chain, cache, n_main=None,
                tree_desc=None):
    """Run ``layer_ids`` on ``h`` ``(1, L, H)`` with one mask per window size.

    With ``n_main`` set, rows from ``n_main`` on are stream rows: they pass
    through the model's stream adapters before each layer and get its
    stream-row LoRA in the projections. ``tree_desc`` (a
    zero-argument callable returning the ``treedesc.TreeDesc`` of ``block``)
    lets tree / multi-stream groups take the fused attention kernel
    (``attention.layer_mask``); without it the dense mask is always used.
    """
    owners = model.layer_owners
    if owners is not None:  # pipeline: each stage runs its layers, then passes h to every rank
        return _run_stages(model, h, list(layer_ids), owners, block, positions, is_chain, cache,
                           n_main, tree_desc)
    return _run_local(model, h, layer_ids, block, positions, is_chain, cache, n_main, tree_desc)


def _run_stages(model, h, layer_ids, owners, block, positions, is_chain, cache, n_main, tree_desc):
    """``run_layers`` over pipeline stages: the rank holding a run of consecutive layers
    computes them; one ``all_sum`` (the others add zeros) gives every rank its output, so
    every rank continues the forward with the same rows."""
    group = model.sharding[1]
    me = group.rank()
    start = 0
    while start < len(layer_ids):
        owner = owners[layer_ids[start]]
        end = start
        while end < len(layer_ids) and owners[layer_ids[end]] == owner:
            end += 1
        if owner == me:
            h = _run_local(model, h, layer_ids[start:end], block, positions, is_chain, cache,
                           n_main, tree_desc)
        else:  # zeros that still depend on h: every rank evaluates every all_sum, in order
            h = mx.depends([mx.zeros_like(h)], [h])[0]
        h = mx.distributed.all_sum(h, group=group)
        start = end
    return h


def _run_local(model, h, layer_ids, block, positions, is_chain, cache, n_main, tree_desc):
    """``run_layers`` on layers this process holds."""
    length = cache[0].length
    offset = rope_offset(length, positions)
    masks = {}
    with model.stream_rows(n_main):
        for i in layer_ids:
            window = model.windows[i]
            if window not in masks:
                masks[window] = layer_mask(
                    model.base, block, length, positions, window, is_chain, tree_desc
                )
            if n_main is not None:
                h = adapt_streams(model, h, i, n_main)
            h = model.layers[i](h, masks[window], cache=StepView(cache[i], offset))
    return h


def adapt_streams(model: SpecStreamModel, h: mx.array, layer: int, n_main: int) -> mx.array:
    """Apply layer ``layer``'s stream adapter to rows ``n_main:`` of ``h`` ``(B, L, H)``."""
    if not model.stream_adapters or h.shape[1] == n_main:
        return h
    adapter = model.stream_adapters[layer - model.first_stream_layer]
    return mx.concatenate([h[:, :n_main], adapter(h[:, n_main:])], axis=1)


def _edge_logprobs(model, h: mx.array, tokens: mx.array, tree: Tree) -> mx.array:
    """Early-exit ``log p(token_i | parent_i)`` for every node. ``(1, N, H) -> (N,)``."""
    parents = tree.parents[1:]
    sources = np.unique(parents)  # rows whose next-token distribution we need
    row_of = np.searchsorted(sources, parents)
    exits = model.base.model.norm(model.prune_adapter(h[0, mx.array(sources)]))
    out = logits(model, exits).astype(mx.float32)  # (P, V)
    lse = mx.logsumexp(out, axis=-1)  # (P,)
    rows = mx.array(row_of)
    picked = out[rows, tokens[1:]] - lse[rows]
    return mx.concatenate([mx.zeros((1,)), picked])


def forward(
    model: SpecStreamModel,
    tokens: mx.array,
    rows: Rows,
    cache: Sequence[LayerCache],
    *,
    tree: Optional[Tree] = None,
    prune: Optional[PruneSettings] = None,
    streams: Optional[int] = None,
) -> ForwardOutput:
    """Run the model on new rows, writing their keys/values as pending in ``cache``.

    Nothing is committed: call ``cache.commit`` with the accepted rows.

    Args:
        model: the Speculative Streaming model.
        tokens: ``(M,)`` token ids of the main rows.
        rows: their structure (positions, ancestor mask, stream rows).
        cache: the tree cache (one ``LayerCache`` per layer).
        tree: the draft tree's topology (``rows`` must be its rows), needed
            only for pruning.
        prune: pruning settings, or ``None``.
        streams: run only streams ``1..streams`` of each stream node (default:
            all ``gamma``). Exact: stream ``j`` sees streams ``1..j`` of its
            node and main rows only, and no main row sees a stream (in either
            mode), so dropping the deeper streams changes nothing else. A tree
            of depth ``d < gamma`` needs just ``d``.

    Returns:
        A ``ForwardOutput``.
    """
    config = model.config
    gamma, split = config.gamma, model.first_stream_layer
    if streams is not None:
        assert 1 <= streams <= gamma, streams
        gamma = streams

    h = embed(model.family, model.base, tokens[None])  # (1, M, H)
    h = run_layers(
        model, h, range(split), rows.ancestors, rows.depth, rows.is_chain, cache,
        tree_desc=partial(describe, rows, gamma, False),
    )

    kept = None
    if prune is not None and tree is not None and tree.size > 1:
        edges = _edge_logprobs(model, h, tokens, tree)
        kept = prune_tree(tree, np.array(edges), prune.threshold, prune.max_keep)
        if kept.size < rows.size:
            remap = -np.ones(rows.size, dtype=np.int64)
            remap[kept] = np.arange(kept.size)
            nodes = remap[rows.stream_nodes]
            rows = replace(
                rows,
                depth=rows.depth[kept],
                ancestors=rows.ancestors[np.ix_(kept, kept)],
                stream_nodes=nodes[nodes >= 0],
            )
            h = h[:, mx.array(kept)]
        else:
            kept = None

    n_main, n_stream = rows.size, rows.stream_nodes.shape[0]
    if n_stream:
        table = model.stream_embeddings[:gamma].astype(h.dtype)  # (gamma, H)
        stream_rows = h[:, mx.array(rows.stream_nodes)][:, :, None, :] + table  # (1, S, gamma, H)
        h = mx.concatenate([h, stream_rows.reshape(1, n_stream * gamma, -1)], axis=1)
        block = msa_block(rows, gamma)
        positions = row_positions(rows, gamma, with_streams=True)
        is_chain = False
    else:
        block, positions, is_chain = rows.ancestors, rows.depth, rows.is_chain
    tree_desc = partial(describe, rows, gamma, n_stream > 0)
    h = run_layers(model, h, range(split, model.num_layers), block, positions, is_chain, cache,
                    n_main=n_main if n_stream else None, tree_desc=tree_desc)
    h = model.base.model.norm(h[0])  # (M' + S*gamma, H)

    slot = -np.ones(n_main, dtype=np.int64)
    slot[rows.stream_nodes] = np.arange(n_stream)
    stream_hidden = h[n_main:].reshape(n_stream, gamma, -1) if n_stream else None
    return ForwardOutput(h[:n_main], stream_hidden, kept, slot)
