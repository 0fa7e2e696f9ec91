"""RoPE with one position per row.

mlx-lm's attention calls ``self.rope(x, offset=cache.offset)`` with an int.
Tree and stream rows need a position each. ``mx.fast.rope`` accepts one offset
per *batch* entry, so ``PositionalRoPE`` moves the rows of ``x`` to the batch
axis, applies the wrapped RoPE with a ``(L,)`` offset array, and moves them
back. With an int offset it is exactly the wrapped module, so a model with the
wrapper installed still decodes through mlx-lm unchanged.
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx
import mlx.nn as nn


class RowPositions:
    """Absolute positions, one per row of the sequence axis, as a RoPE ``offset``.

    A distinct type, so per-row positions are never confused with mlx-lm's
    per-*sequence* offset arrays (batched caches pass those).

    Attributes:
        positions: ``(L,)`` int32 array.
    """

    def __init__(self, positions: mx.array) -> None:
        self.positions = positions


class PositionalRoPE(nn.Module):
    """Wrap a RoPE module so that ``offset`` may be ``RowPositions``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array, offset: Union[int, mx.array, RowPositions] = 0) -> mx.array:
        if isinstance(offset, RowPositions):
            batch, heads, length, dim = x.shape
            # (B, H, L, D) -> (L, B*H, 1, D): one "batch" entry per row, every
            # sequence of the batch sharing the row positions.
            rows_first = x.transpose(2, 0, 1, 3).reshape(length, batch * heads, 1, dim)
            out = self.inner(rows_first, offset=offset.positions)
            return out.reshape(length, batch, heads, dim).transpose(1, 2, 0, 3)
        return self.inner(x, offset=offset)


def install_positional_rope(layers) -> None:
    """Wrap the RoPE of every attention layer (idempotent)."""
    for layer in layers:
        if layer is None:  # a layer another pipeline stage holds
            continue
        attn = layer.self_attn
        if not isinstance(attn.rope, PositionalRoPE):
            attn.rope = PositionalRoPE(attn.rope)
