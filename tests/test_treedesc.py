"""The compact tree description reproduces the runtime's dense masks exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from .kernel_cases import random_parents, tree_rows
from specstream_mlx.masks import build_mask, chain_rows, msa_block, row_positions
from specstream_mlx.treedesc import dense_mask, describe, pack_bits, unpack_bits, visibility_block

# Root 0; 1 and 2 children of 0; 3 child of 1. Streams (gamma 2) on nodes 1 and 3.
PARENTS = np.array([-1, 0, 0, 1])
LOSSLESS_TABLE = [
    [0, 0, 0, 0b0001],
    [1, 0, 0, 0b0011],
    [1, 0, 0, 0b0101],
    [2, 0, 0, 0b1011],
    [2, 4, 1, 0b0011],  # stream (node 1, j=1): sees 0, 1 and itself
    [3, 4, 2, 0b0011],  # stream (node 1, j=2): also stream (1, 1)
    [3, 6, 1, 0b1011],
    [4, 6, 2, 0b1011],
]


def as_array(mask, size: int, offset: int) -> np.ndarray:
    """``build_mask``'s result as a dense bool array."""
    if mask is None:
        return np.ones((size, offset + size), dtype=bool)
    if isinstance(mask, str):
        assert mask == "causal"
        return np.arange(offset + size)[None, :] <= offset + np.arange(size)[:, None]
    return np.array(mask)


def test_literal_table_lossless():
    rows = tree_rows(PARENTS, np.array([1, 3]))
    desc = describe(rows, gamma=2, with_streams=True)
    assert desc.table.dtype == np.uint32 and desc.n_main == 4
    assert desc.table.tolist() == LOSSLESS_TABLE


def test_literal_table_without_streams():
    rows = tree_rows(PARENTS, np.array([1, 3]))
    lower = describe(rows, gamma=2, with_streams=False)
    assert lower.table.tolist() == [r[:1] + [0, 0] + r[3:] for r in LOSSLESS_TABLE[:4]]


def test_literal_dense_mask_with_window():
    rows = tree_rows(PARENTS, np.array([1, 3]))
    desc = describe(rows, gamma=2, with_streams=True)
    full = dense_mask(desc, offset=2, window=None)
    assert full[4].astype(int).tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    windowed = dense_mask(desc, offset=2, window=3)
    # Row 7 sits at 6: keys at positions > 3 only -> node 3 (4), streams 6 (5) and 7 (6).
    assert windowed[7].astype(int).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 1, 1]
    block = msa_block(rows, 2)
    positions = row_positions(rows, 2, True)
    assert np.array_equal(windowed, np.array(build_mask(block, 2, positions, 3)))


def test_bit_packing_roundtrip_across_words():
    rng = np.random.default_rng(0)
    bits = rng.random((5, 70)) < 0.5
    words = pack_bits(bits)
    assert words.shape == (5, 3) and words.dtype == np.uint32
    assert np.array_equal(unpack_bits(words, 70), bits)
    assert pack_bits(np.eye(33, dtype=bool))[32].tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_reproduce_msa_block_and_build_mask(seed):
    rng = np.random.default_rng(seed)
    nodes = int(rng.integers(1, 45))
    parents = random_parents(nodes, rng, shuffle=bool(seed % 2))
    pick = rng.random(nodes) < 0.6
    rows = tree_rows(parents, np.nonzero(pick)[0])
    gamma = int(rng.integers(1, 5))
    with_streams = bool(pick.any()) and seed % 5 != 0
    desc = describe(rows, gamma, with_streams)
    block = msa_block(rows, gamma) if with_streams else rows.ancestors
    positions = row_positions(rows, gamma, with_streams)
    assert np.array_equal(visibility_block(desc), block)
    assert np.array_equal(desc.positions, positions)
    for offset in (0, 1, int(rng.integers(2, 90))):
        for window in (None, int(rng.integers(1, 12)), 4096):
            dense = build_mask(block, offset, positions, window, False)
            assert np.array_equal(dense_mask(desc, offset, window),
                                  as_array(dense, desc.size, offset)), (offset, window)


@pytest.mark.parametrize("n,streams", [(1, None), (5, None), (5, [4]), (3, [0, 1, 2])])
def test_chain_rows(n, streams):
    rows = chain_rows(n, None if streams is None else np.array(streams))
    with_streams = streams is not None
    desc = describe(rows, 3, with_streams)
    assert desc.is_chain == (not with_streams)
    block = msa_block(rows, 3) if with_streams else rows.ancestors
    positions = row_positions(rows, 3, with_streams)
    for offset, window in ((0, None), (7, None), (7, 4)):
        dense = build_mask(block, offset, positions, window, desc.is_chain)
        assert np.array_equal(dense_mask(desc, offset, window),
                              as_array(dense, desc.size, offset))


def test_bad_stream_nodes_are_rejected():
    rows = tree_rows(PARENTS, np.array([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        describe(rows, 2, True)
    rows = tree_rows(PARENTS, np.array([4]))
    with pytest.raises(ValueError, match="out of range"):
        describe(rows, 2, True)


def test_table_is_small_compared_with_the_dense_mask():
    """40 nodes x 4 rows, 2048-token prefix: the table is a tiny fraction of the mask."""
    rows = tree_rows(random_parents(40, np.random.default_rng(1), False), np.arange(40))
    desc = describe(rows, 3, True)
    assert desc.size == 160 and desc.table.shape == (160, 5)  # 3 columns + 2 words for 40 rows
    assert desc.table.nbytes == 3200 and desc.size * (2048 + desc.size) == 353280
    assert desc.table.nbytes * 100 < desc.size * (2048 + desc.size)
    uploaded = mx.array(desc.table)  # what the kernel gets: uint32, unchanged
    assert uploaded.dtype == mx.uint32 and np.array_equal(np.array(uploaded), desc.table)
