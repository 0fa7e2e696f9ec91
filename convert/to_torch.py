"""An MLX Speculative Streaming model as a PyTorch ``SpecStreamReference``.

The reference gets the MLX model's own weights (base and streams), so what the
reference computes is what the MLX runtime computes; the Core ML export traces
a module built on it. Parameter names match: mlx-lm keeps the Hugging Face
names of the base, and the stream parameters have the same names on both sides.
Needs torch (``pip install "specstream-mlx[torch]"``).
"""

from __future__ import annotations

import numpy as np
from mlx.utils import tree_flatten

from .common import ConversionError
from .hf_weights import import_torch

#: ``model_type``s whose mlx-lm modules the reference reproduces.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text")


def reference_config(model) -> dict:
    """The reference's config for an MLX ``SpecStreamModel``: the mlx-lm args as computed.

    Raises:
        ConversionError: settings the reference does not reproduce (quantized
            weights, traditional RoPE, unknown architecture).
    """
    base = model.base
    args = {k: v for k, v in vars(base.args).items() if v is not None}
    kind = args.get("model_type")
    if kind not in SUPPORTED:
        raise ConversionError(
            f"model type {kind!r} has no PyTorch reference; supported: {', '.join(SUPPORTED)}"
        )
    names = [name for name, _ in tree_flatten(base.parameters())]
    if any(name.endswith(".scales") for name in names):
        raise ConversionError(
            "the model is quantized (MLX quantized layers); use its float version "
            "(convert without -q, or with --dequantize)"
        )
    if args.get("rope_traditional"):
        raise ConversionError("traditional (interleaved) RoPE is not reproduced by the PyTorch reference")
    if model.config.stream_lora_rank:
        raise ConversionError(
            "stream LoRA (stream_lora_rank > 0) is not in the PyTorch reference yet; "
            "export streams trained without --stream-lora-rank"
        )
    args["tie_word_embeddings"] = "lm_head" not in base
    if kind == "gemma":  # mlx-lm's gemma computes the exact GELU whatever the config says
        args["hidden_act"] = "gelu"
    return args


def to_reference(model, dtype=None):
    """A ``SpecStreamReference`` (eval mode) holding ``model``'s weights.

    Args:
        model: an MLX ``SpecStreamModel`` (float weights).
        dtype: torch dtype of the reference (default float32).

    Raises:
        ConversionError: see ``reference_config``; weights that do not fit the reference.
    """
    torch = import_torch()
    from .reference import SpecStreamReference

    config = model.config
    args = reference_config(model)
    try:
        ref = SpecStreamReference(
            args, config.gamma, config.stream_layers, config.mode, config.prune_rank,
            config.stream_adapter_rank,
        )
    except NotImplementedError as exc:
        raise ConversionError(str(exc)) from None

    base = {name: _to_torch(torch, value) for name, value in tree_flatten(model.base.parameters())}
    try:
        ref.load_base(base)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise ConversionError(f"the MLX weights do not fit the PyTorch reference ({reason})") from None
    streams = {name: _to_torch(torch, value) for name, value in model.stream_parameters().items()}
    missing, unexpected = ref.load_state_dict(streams, strict=False)
    missing = [name for name in missing if not name.startswith("base.")]
    if missing or unexpected:
        raise ConversionError(
            f"the stream parameters do not fit the PyTorch reference: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return ref.to(dtype or torch.float32).eval()


def _to_torch(torch, value):
    """An MLX array as a float32 CPU tensor (computed in float32 whatever it is stored as)."""
    import mlx.core as mx

    return torch.from_numpy(np.array(value.astype(mx.float32)))
