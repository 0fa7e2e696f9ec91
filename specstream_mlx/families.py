"""Which mlx-lm architectures the runtime drives, and how.

The runtime calls an mlx-lm model piece by piece: embedding, each decoder layer
as ``layer(h, mask, cache)``, final norm, LM head. The pieces are the same
across the families below except for embedding scaling, the LM head (tied or
not) and sliding-window layers, which ``Family`` describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's ``model_type`` is not one the runtime can drive."""


@dataclass(frozen=True)
class Family:
    """How to drive one mlx-lm architecture.

    Attributes:
        name: the mlx-lm module name.
        embed_scale: multiply embeddings by sqrt(hidden) (Gemma).
        embed_scale_bf16: round that factor through bfloat16 (Gemma 3, as mlx-lm does).
    """

    name: str
    embed_scale: bool = False
    embed_scale_bf16: bool = False


FAMILIES = {
    "llama": Family("llama"),
    "mistral": Family("llama"),  # mlx-lm maps mistral onto llama
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "phi3": Family("phi3"),
    "gemma": Family("gemma", embed_scale=True),
    "gemma3_text": Family("gemma3_text", embed_scale=True, embed_scale_bf16=True),
}


def family_for(model_type: Optional[str]) -> Family:
    """The ``Family`` of a config's ``model_type``.

    Raises:
        UnsupportedArchitectureError: for any other architecture.
    """
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: specstream-mlx supports {supported}"
        )
    return FAMILIES[model_type]


def embed(family: Family, base: nn.Module, tokens: mx.array) -> mx.array:
    """Token embeddings as the base model computes them. ``(1, L) -> (1, L, H)``."""
    h = base.model.embed_tokens(tokens)
    if family.embed_scale:
        scale = base.args.hidden_size**0.5
        if family.embed_scale_bf16:
            h = h * mx.array(scale, mx.bfloat16).astype(h.dtype)
        else:
            h = h * scale
    return h


def lm_head_weight(base: nn.Module, needed_by: str) -> mx.array:
    """The LM head's ``(V, H)`` weight (the embedding for tied heads), for code that
    scores hidden states against some of its rows.

    Raises:
        ValueError: the head is quantized or has a bias (``needed_by`` says who asked).
    """
    head = base.lm_head if "lm_head" in base else base.model.embed_tokens
    if not hasattr(head, "weight") or head.weight.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"{needed_by} needs an unquantized LM head; use a float model")
    if "lm_head" in base and "bias" in base.lm_head:
        raise ValueError(f"{needed_by} does not support an LM head with a bias")
    return head.weight


def lm_head(base: nn.Module, h: mx.array) -> mx.array:
    """Logits from final-norm hidden states. ``(..., H) -> (..., V)``."""
    if "lm_head" in base:
        return base.lm_head(h)
    return base.model.embed_tokens.as_linear(h)


def layer_windows(family: Family, base: nn.Module) -> list[Optional[int]]:
    """Sliding-window size per layer (``None`` = full attention), as mlx-lm applies it."""
    layers = base.model.layers
    if family.name == "gemma3_text":
        pattern = base.args.sliding_window_pattern
        window = base.args.sliding_window
        return [None if i % pattern == pattern - 1 else window for i in range(len(layers))]
    window = getattr(base.model, "sliding_window", None)
    return [window if getattr(layer, "use_sliding", False) else None for layer in layers]
