"""Numerical check of an exported step (through the host loop's inputs) against MLX.

The scenario covers what the Core ML program must get right: a prompt in two
chunks (the second padded), a tree step with a branching tree mask, a commit
of a non-contiguous accepted path (slot copies in the state), and a second
tree step that reads the committed rows. Every main and stream logit of every
real row is compared with the MLX runtime's ``forward`` + ``cache.commit``.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .host import Layout, Session


def deepest_path(parents: np.ndarray) -> list:
    """Root-to-leaf path of the last node (the last node is a leaf in parents-first order)."""
    path, node = [], len(parents) - 1
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]


def compare(backend, model, layout: Layout, tree_size: Optional[int] = None,
            seed: int = 0) -> Dict[str, float]:
    """Run the scenario on ``backend`` and on MLX; return the largest differences.

    Args:
        backend: a ``host`` backend (fresh state is taken).
        model: the MLX ``SpecStreamModel`` the backend was exported from.
        layout: the package layout.
        tree_size: the tree to use (default ``layout.tree_default``).
        seed: for the random prompt and draft tokens.

    Returns:
        Max absolute difference per checked output, plus ``"scale"``: the
        largest absolute MLX logit (for relative tolerances) and ``"path"``:
        the committed path's length.
    """
    import mlx.core as mx

    from ..cache import commit, make_cache
    from ..masks import tree_rows
    from ..forward import forward, logits
    from ..masks import chain_rows

    rng = np.random.default_rng(seed)
    vocab = layout.vocab_size
    tree = layout.trees[tree_size or layout.tree_default]
    chunk = layout.tree_sizes[-1]
    prompt = rng.integers(0, vocab, chunk + 3).tolist()
    session = Session(backend, layout)
    cache = make_cache(model.num_layers)
    errors, scale = {}, 0.0

    def check(name, got, mlx_hidden):
        nonlocal scale
        want = np.array(logits(model, mlx_hidden).astype(mx.float32))
        scale = max(scale, float(np.abs(want).max()))
        errors[name] = float(np.abs(got - want).max())

    # Prompt: the host sends two chunks; MLX runs it at once (causal, streams on every row).
    mains, streams = [], []
    for begin in range(0, len(prompt), chunk):
        part = prompt[begin : begin + chunk]
        n = len(part)
        main, stream = session.call(part, np.arange(n), np.tril(np.ones((n, n), bool)))
        session.commit(range(n))
        mains.append(main)
        streams.append(stream)
    out = forward(model, mx.array(prompt), chain_rows(len(prompt), np.arange(len(prompt))), cache)
    commit(cache, np.arange(len(prompt)), None, model.num_layers)
    check("prefill_main", np.concatenate(mains), out.main_hidden)
    check("prefill_streams", np.concatenate(streams), out.stream_hidden)

    path = deepest_path(tree.parents)
    for step in ("tree", "after_commit"):
        tokens = rng.integers(0, vocab, tree.size)
        main, stream = session.call(tokens.tolist(), tree.depth, tree.mask)
        out = forward(model, mx.array(tokens), tree_rows(tree), cache)
        check(f"{step}_main", main, out.main_hidden)
        check(f"{step}_streams", stream, out.stream_hidden)
        session.commit(path)
        commit(cache, path, None, model.num_layers)
    errors["scale"] = scale
    errors["path"] = float(len(path))
    return errors


def worst(errors: Dict[str, float]) -> float:
    """The largest difference relative to the logit scale (at least 1)."""
    diffs = [v for k, v in errors.items() if k not in ("scale", "path")]
    return max(diffs) / max(1.0, errors["scale"])
