"""Build, cast, quantize and save the mlx-lm part of a converted checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .common import ConversionError


def _quantize_from_config(model: nn.Module, quantization: dict) -> None:
    """Swap in quantized layers where ``quantization`` (mlx-lm's config entry) says."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and path in quantization.get("_paths", ())

    nn.quantize(
        model, quantization["group_size"], quantization["bits"], class_predicate=predicate
    )


def build_model(config: dict, weights: Dict[str, mx.array]) -> nn.Module:
    """The mlx-lm model of ``config`` holding ``weights`` (Hugging Face names).

    ``config["quantization"]`` may name quantized layers: default settings plus
    a ``{"group_size", "bits"}`` entry per layer path that differs.

    Raises:
        ConversionError: the weights do not match the architecture.
    """
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"cannot build a {config.get('model_type')} model from the config: {exc}") from None
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    quantization = config.get("quantization")
    if quantization:
        paths = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
        _quantize_from_config(model, {**quantization, "_paths": paths})
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ConversionError(
            f"the weights do not match a {config['model_type']} model with this config: {exc}"
        ) from None
    return model


def cast(model: nn.Module, dtype: Optional[mx.Dtype]) -> None:
    """Cast floating parameters (quantization scales included) to ``dtype``."""
    if dtype is None:
        return
    model.update(
        tree_map(
            lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters(),
        )
    )


def dequantize(model: nn.Module, dtype: mx.Dtype) -> None:
    """Replace quantized layers with float ones of ``dtype`` (computed in float32)."""
    from mlx.utils import tree_unflatten

    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(
                module.weight, module.scales.astype(mx.float32),
                module.biases.astype(mx.float32), module.group_size, module.bits,
            ).astype(dtype)  # (out, in)
            if isinstance(module, nn.QuantizedEmbedding):
                layer = nn.Embedding(*weight.shape)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    layer.bias = module.bias
            layer.weight = weight
            swaps.append((name, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def quantize(model: nn.Module, config: dict, bits: int, group_size: int) -> dict:
    """Quantize the float layers of ``model`` (layers already quantized stay as they are).

    Returns:
        The config with its ``quantization`` entry describing every quantized layer.
    """
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ConversionError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ConversionError(f"--q-group-size must be 32, 64 or 128, got {group_size}")

    def predicate(path, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    return describe_quantization(model, config)


def describe_quantization(model: nn.Module, config: dict) -> dict:
    """``config`` with mlx-lm's ``quantization`` entry for the model's quantized layers."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    layers = {
        name: (m.group_size, m.bits)
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not layers:
        return config
    (group, bits), _ = Counter(layers.values()).most_common(1)[0]
    entry = {"group_size": group, "bits": bits, "mode": "affine"}
    for name, (g, b) in sorted(layers.items()):
        if (g, b) != (group, bits):
            entry[name] = {"group_size": g, "bits": b, "mode": "affine"}
    config["quantization"] = entry
    config["quantization_config"] = entry
    return config


def save_base(model: nn.Module, config: dict, out: Path) -> None:
    """Write the model weights (mlx-lm layout) and ``config.json`` into ``out``."""
    from mlx_lm.utils import save_model

    mx.eval(model.parameters())
    save_model(out, model)
    (Path(out) / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")

