"""The tree KV cache: commit after a tree step, pruned rows, fewer streams, and per-row RoPE."""

import mlx.core as mx
import numpy as np
import pytest

from .helpers import random_prompt, ss_model
from specstream_mlx.cache import cache_length, commit, make_cache
from specstream_mlx.forward import forward, logits
from specstream_mlx.masks import chain_rows, tree_rows
from specstream_mlx.rope import PositionalRoPE, RowPositions
from specstream_mlx.tree import build_tree


def _full_logits(base, tokens):
    return base(mx.array(tokens)[None])[0]  # (L, V) without any cache


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_commit_then_next_logits_match_sequential(family):
    model = ss_model(family)
    prompt = random_prompt(20, seed=5)
    cache = make_cache(model.num_layers)
    forward(model, mx.array(prompt), chain_rows(20, [19]), cache)
    commit(cache, np.arange(20), None, model.num_layers)

    # A (2, 2) tree whose root is r and whose accepted path is r -> b -> d
    # (non-contiguous rows: 0, 2, 6), the rest rejected.
    tree = build_tree((2, 2))  # nodes: 0; 1,2; 3,4 (under 1); 5,6 (under 2)
    tokens = np.array([7, 11, 12, 13, 14, 15, 16])
    out = forward(model, mx.array(tokens), tree_rows(tree), cache)
    path = [0, 2, 6]
    commit(cache, path, out.kept, model.first_stream_layer)
    assert cache_length(cache) == 23

    nxt = 42
    step = forward(model, mx.array([nxt]), chain_rows(1), cache)
    got = logits(model, step.main_hidden)[-1]
    sequence = prompt + [int(tokens[i]) for i in path] + [nxt]
    want = _full_logits(model.base, sequence)[-1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)

    # The tree's own main logits are those of the sequence along each path.
    tree_logits = logits(model, out.main_hidden)
    want_path = _full_logits(model.base, prompt + [7, 12, 16])[-3:]
    np.testing.assert_allclose(np.array(tree_logits[mx.array(path)]), np.array(want_path),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("streams", [1, 2])
def test_fewer_streams_are_the_first_streams_exactly(streams):
    # Lossless mode: stream j sees main rows and streams 1..j only, so running
    # streams 1..d gives the same rows (and main rows) as running all gamma.
    model = ss_model("llama", gamma=3, adapter_rank=4)
    prompt = random_prompt(10, seed=8)
    tree = build_tree((2, 1))
    tokens = mx.array(prompt[-1:] + [4, 5, 6, 7])
    outs = []
    for count in (None, streams):
        cache = make_cache(model.num_layers)
        forward(model, mx.array(prompt[:-1]), chain_rows(9, [8]), cache, streams=count)
        commit(cache, np.arange(9), None, model.num_layers)
        outs.append(forward(model, tokens, tree_rows(tree), cache, streams=count))
    full, few = outs
    assert few.stream_hidden.shape == (tree.size, streams, full.stream_hidden.shape[-1])
    np.testing.assert_allclose(np.array(few.stream_hidden), np.array(full.stream_hidden[:, :streams]),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(few.main_hidden), np.array(full.main_hidden),
                               atol=1e-5, rtol=1e-5)


def test_commit_with_pruning_maps_rows():
    model = ss_model("llama")
    prompt = random_prompt(12, seed=6)
    cache = make_cache(model.num_layers)
    forward(model, mx.array(prompt), chain_rows(12, [11]), cache)
    commit(cache, np.arange(12), None, model.num_layers)
    from specstream_mlx.config import PruneSettings

    tree = build_tree((3, 1))  # 0; 1,2,3; 4,5,6
    tokens = mx.array([5, 6, 7, 8, 9, 10, 11])
    out = forward(model, tokens, tree_rows(tree), cache, tree=tree,
                  prune=PruneSettings(threshold=0.0, max_keep=3))
    assert out.kept is not None and out.kept.size == 3
    path = out.kept[:2].tolist()  # root and its best surviving child
    commit(cache, path, out.kept, model.first_stream_layer)
    step = forward(model, mx.array([3]), chain_rows(1), cache)
    got = logits(model, step.main_hidden)[-1]
    sequence = prompt + [int(np.array(tokens)[i]) for i in path] + [3]
    want = _full_logits(model.base, sequence)[-1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)


def test_positional_rope_matches_row_by_row():
    import mlx.nn as nn

    rope = nn.RoPE(16, base=10000.0)
    x = mx.random.normal((1, 2, 5, 16))
    positions = [3, 4, 4, 9, 0]
    got = PositionalRoPE(rope)(x, offset=RowPositions(mx.array(positions)))
    want = mx.concatenate(
        [rope(x[:, :, i : i + 1], offset=p) for i, p in enumerate(positions)], axis=2
    )
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    np.testing.assert_array_equal(np.array(PositionalRoPE(rope)(x, offset=2)),
                                  np.array(rope(x, offset=2)))
    # A batch of sequences sharing row positions (training).
    xb = mx.random.normal((3, 2, 5, 16))
    got = PositionalRoPE(rope)(xb, offset=RowPositions(mx.array(positions)))
    for b in range(3):
        want = PositionalRoPE(rope)(xb[b : b + 1], offset=RowPositions(mx.array(positions)))
        np.testing.assert_allclose(np.array(got[b : b + 1]), np.array(want), atol=1e-6)
    # mlx-lm's per-sequence offsets (batched caches) pass straight through.
    per_sequence = mx.array([0, 3, 7])
    np.testing.assert_array_equal(np.array(PositionalRoPE(rope)(xb, offset=per_sequence)),
                                  np.array(rope(xb, offset=per_sequence)))
