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


class PositionalRoPE(nn.Module):
    """Wrap a RoPE module so that ``offset`` may be a ``(L,)`` array of positions."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        if isinstance(offset, mx.array) and offset.ndim == 1:
            # x: (1, H, L, D) -> (L, H, 1, D): one "batch" entry per row.
            assert x.shape[0] == 1, "per-row positions need batch size 1"
            rows_first = x.transpose(2, 1, 0, 3)
            return self.inner(rows_first, offset=offset).transpose(2, 1, 0, 3)
        return self.inner(x, offset=offset)


def install_positional_rope(layers) -> None:
    """Wrap the RoPE of every attention layer (idempotent)."""
    for layer in layers:
        attn = layer.self_attn
        if not isinstance(attn.rope, PositionalRoPE):
            attn.rope = PositionalRoPE(attn.rope)
