"""Verification: which drafted tree nodes the target model accepts."""

import numpy as np

from specstream_mlx.tree import build_tree
from specstream_mlx.verify import accept_greedy


def test_accept_greedy_follows_argmax():
    tree = build_tree((2, 1)).with_tokens(np.array([10, 11, 12, 13, 14]))
    # root predicts 12 (node 2), node 2 predicts 14 (node 4), node 4 predicts 99.
    argmax = np.array([12, 0, 14, 0, 99])
    assert accept_greedy(tree, argmax) == [0, 2, 4]
    assert accept_greedy(tree, np.array([7, 0, 0, 0, 0])) == [0]
