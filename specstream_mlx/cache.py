"""Tree KV cache.

mlx-lm's attention layers talk to their cache through two members: ``offset``
(handed to RoPE) and ``update_and_fetch(keys, values)``. ``LayerCache`` holds
one layer's committed keys/values; for each forward, ``step_views`` hands every
layer a ``StepView`` whose ``offset`` is the per-row positions and whose
``update_and_fetch`` writes *all* new rows (tree nodes and stream rows) behind
the committed prefix, without committing them, and returns prefix + new rows.

After verification, ``commit`` gathers the accepted rows (root + accepted
path, in path order) to the front of that pending region and advances the
length; everything else (rejected nodes, all stream rows) is left behind as
garbage that the next forward overwrites. Only the main stream is ever cached.

Sliding-window layers use the same plain cache; their window is applied in the
mask (``masks.build_mask``), so key order is always position order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .rope import RowPositions

_STEP = 256  # grow buffers in chunks of this many rows, like mlx-lm's KVCache


class LayerCache:
    """Committed keys/values of one attention layer.

    Attributes:
        keys, values: ``(1, H_kv, capacity, D)`` buffers or ``None``.
        length: number of committed rows (= position of the next token).
    """

    def __init__(self) -> None:
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.length = 0

    def _reserve(self, rows: int, keys: mx.array, values: mx.array) -> None:
        need = self.length + rows
        have = 0 if self.keys is None else self.keys.shape[2]
        if need <= have:
            return
        grow = ((need - have + _STEP - 1) // _STEP) * _STEP
        _, heads, _, k_dim = keys.shape
        new_k = mx.zeros((1, heads, grow, k_dim), keys.dtype)
        new_v = mx.zeros((1, heads, grow, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def write_pending(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write new rows behind the committed prefix; return prefix + new rows.

        Args:
            keys, values: ``(1, H_kv, L, D)`` for the ``L`` rows of this forward.
        """
        rows = keys.shape[2]
        self._reserve(rows, keys, values)
        end = self.length + rows
        self.keys[..., self.length : end, :] = keys
        self.values[..., self.length : end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]

    def commit(self, rows: np.ndarray) -> None:
        """Keep pending rows ``rows`` (indices into the last forward's rows), in order."""
        rows = np.asarray(rows, dtype=np.int64)
        n = int(rows.shape[0])
        if n == 0:
            return
        # (no keys: a layer another pipeline stage runs; only the length is kept)
        if self.keys is not None and not np.array_equal(rows, np.arange(n)):
            src = mx.array(rows + self.length)
            self.keys[..., self.length : self.length + n, :] = self.keys[..., src, :]
            self.values[..., self.length : self.length + n, :] = self.values[..., src, :]
        self.length += n

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class StepView:
    """What one attention layer sees as its ``cache`` during one forward.

    ``offset`` is an ``int`` for consecutive rows (mlx-lm's usual meaning) or
    ``RowPositions``, which ``rope.PositionalRoPE`` applies row by row.
    """

    def __init__(self, layer: LayerCache, offset: Union[int, RowPositions]) -> None:
        self.layer = layer
        self.offset = offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.layer.write_pending(keys, values)


def make_cache(num_layers: int) -> list[LayerCache]:
    """A fresh, empty tree cache: one ``LayerCache`` per layer."""
    return [LayerCache() for _ in range(num_layers)]


def cache_length(cache: Sequence[LayerCache]) -> int:
    """Committed length (all layers agree)."""
    return cache[0].length


def rope_offset(length: int, positions: np.ndarray) -> Union[int, RowPositions]:
    """RoPE offset for rows at ``length + positions``: an int when consecutive."""
    if positions.shape[0] == 0 or np.array_equal(positions, np.arange(positions.shape[0])):
        return length
    return RowPositions(mx.array((positions + length).astype(np.int32)))


def commit(
    cache: Sequence[LayerCache],
    path: Sequence[int],
    kept: Optional[np.ndarray],
    first_pruned_layer: int,
) -> None:
    """Commit the accepted rows of the last forward in every layer.

    Args:
        cache: the tree cache.
        path: accepted main-row indices in path order (root first), as indices
            into the rows of the *unpruned* forward.
        kept: sorted indices of the rows that survived pruning, or ``None``.
        first_pruned_layer: layers from this index on saw only ``kept`` rows.
    """
    path = np.asarray(path, dtype=np.int64)
    upper = path if kept is None else np.searchsorted(kept, path)
    for index, layer in enumerate(cache):
        layer.commit(upper if index >= first_pruned_layer else path)


def cache_state(cache: Sequence[LayerCache]) -> list[mx.array]:
    """Arrays to ``mx.eval`` to materialise the cache."""
    return [a for layer in cache for a in layer.state]
