"""Tree logic and masks: pure functions checked against literal expectations."""

import numpy as np
import pytest

from specstream_mlx.masks import Rows, build_mask, chain_rows, msa_block, row_positions
from specstream_mlx.tree import Tree, ancestor_mask, build_tree, chain_tree, draft_token_index, path_logprobs, prune_tree, subtree


def test_build_tree_two_by_one():
    tree = build_tree((2, 1))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2]
    assert tree.rank.tolist() == [-1, 0, 1, 0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(tree.mask, expected)
    assert tree.children == ((1, 2), (3,), (4,), (), ())


def test_full_tree_size_matches_formula():
    # 1 + sum_{g<=gamma} k^g for gamma = 3, k = 3
    assert build_tree((3, 3, 3)).size == 40


def test_max_nodes_keeps_most_promising_subtree():
    tree = build_tree((3, 2, 1), max_nodes=6)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.rank.tolist() == [-1, 0, 1, 0, 1, 0]


def test_chain_tree_mask_is_lower_triangular():
    tree = chain_tree(3)
    np.testing.assert_array_equal(tree.mask, np.tril(np.ones((4, 4), dtype=bool)))


def test_ancestor_mask_any_order():
    # Children listed before their parents.
    parents = np.array([2, -1, 1, 0])
    expected = np.array([
        [1, 1, 1, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(ancestor_mask(parents), expected)


def test_ancestor_mask_rejects_cycles():
    with pytest.raises(ValueError, match="cycle"):
        ancestor_mask(np.array([1, 0]))


def test_bad_widths_rejected():
    with pytest.raises(ValueError):
        build_tree((2, 0))


def test_draft_token_index():
    tree = build_tree((2, 1))
    # table rows: stream 1 -> [0, 1], stream 2 -> [2, 3] with top_k = 2
    assert draft_token_index(tree, 2).tolist() == [0, 1, 2, 2]


def test_prune_tree_threshold_and_cap():
    tree = build_tree((2, 1))
    edges = np.log(np.array([1.0, 0.6, 0.35, 0.5, 0.9]))
    scores = np.exp(path_logprobs(tree, edges))
    np.testing.assert_allclose(scores, [1.0, 0.6, 0.35, 0.3, 0.315])
    assert prune_tree(tree, edges, threshold=0.31).tolist() == [0, 1, 2, 4]
    assert prune_tree(tree, edges, threshold=0.0).tolist() == [0, 1, 2, 3, 4]
    assert prune_tree(tree, edges, threshold=0.0, max_keep=3).tolist() == [0, 1, 2]
    assert prune_tree(tree, edges, threshold=0.99).tolist() == [0]


def test_subtree_reindexes_parents():
    tree = build_tree((2, 1)).with_tokens(np.array([10, 11, 12, 13, 14]))
    sub = subtree(tree, np.array([0, 2, 4]))
    assert sub.parents.tolist() == [-1, 0, 1]
    assert sub.tokens.tolist() == [10, 12, 14]
    np.testing.assert_array_equal(sub.mask, np.tril(np.ones((3, 3), dtype=bool)))


def test_msa_block_chain():
    """Main rows see main rows only (both modes); stream (1, j) sees main 0..1 and (1, 1..j)."""
    rows = chain_rows(2, stream_nodes=np.array([1]))
    expected = np.array([
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(msa_block(rows, gamma=2), expected)


def test_msa_block_tree():
    tree = build_tree((2,))  # root with two children
    rows = Rows(tree.depth, tree.mask, np.arange(3))
    block = msa_block(rows, gamma=1)
    # rows 0..2 main, 3..5 the single stream of nodes 0..2
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(block, expected)
    assert row_positions(rows, 1, with_streams=True).tolist() == [0, 1, 1, 1, 2, 2]


def test_build_mask_prefix_and_window():
    block = np.tril(np.ones((2, 2), dtype=bool))
    positions = np.array([0, 1])
    full = np.array(build_mask(block, offset=3, positions=positions))
    np.testing.assert_array_equal(full, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    windowed = np.array(build_mask(block, offset=3, positions=positions, window=3))
    # query at 3 sees 1..3, query at 4 sees 2..4
    np.testing.assert_array_equal(windowed, [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert build_mask(block, 3, positions, None, is_chain=True) == "causal"
    assert build_mask(block[:1, :1], 3, positions[:1], None, is_chain=True) is None


def test_tree_with_tokens_checks_length():
    with pytest.raises(AssertionError):
        build_tree((2,)).with_tokens(np.array([1, 2]))
    template = build_tree((2,))
    tree = template.with_tokens(np.array([[7], [8], [9]]))  # any shape, one token per node
    assert type(tree) is Tree and template.tokens is None  # a new tree; the template unchanged
    np.testing.assert_array_equal(tree.tokens, [7, 8, 9])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 0])
    np.testing.assert_array_equal(tree.depth, [0, 1, 1])
    np.testing.assert_array_equal(tree.rank, [-1, 0, 1])
    np.testing.assert_array_equal(tree.mask, [[1, 0, 0], [1, 1, 0], [1, 0, 1]])


def test_graft_chain_shares_agreeing_nodes_then_branches():
    from specstream_mlx.tree import graft_chain

    # widths (2, 1): root 0; depth 1: nodes 1, 2; depth 2: node 3 under 1, node 4 under 2
    tree = build_tree((2, 1)).with_tokens(np.array([10, 11, 12, 13, 14]))
    grown = graft_chain(tree, [12, 20, 21])  # agrees with node 2, then leaves the tree
    np.testing.assert_array_equal(grown.parents, [-1, 0, 0, 1, 2, 2, 5])
    np.testing.assert_array_equal(grown.depth, [0, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(grown.tokens, [10, 11, 12, 13, 14, 20, 21])
    np.testing.assert_array_equal(grown.rank, [-1, 0, 1, 0, 0, 1, 0])  # after node 4, its sibling
    assert grown.children[2] == (4, 5)
    np.testing.assert_array_equal(grown.mask[6], [1, 0, 1, 0, 0, 1, 1])
    # a chain the tree already holds adds nothing; one that disagrees at once hangs off the root
    assert graft_chain(tree, [11, 13]) is tree
    fresh = graft_chain(tree, [30])
    np.testing.assert_array_equal(fresh.parents, [-1, 0, 0, 1, 2, 0])
    assert fresh.children[0] == (1, 2, 5)
