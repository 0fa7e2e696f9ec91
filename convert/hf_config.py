"""Hugging Face ``config.json`` -> the config mlx-lm reads.

transformers writes only the values that differ from its defaults and, since
version 5, keeps RoPE settings under ``rope_parameters``. mlx-lm reads a
top-level ``rope_theta`` (falling back to its own, sometimes different,
default) and has its own defaults for keys such as ``tie_word_embeddings``. So
the config is first completed with transformers' defaults for its
``model_type``, then rewritten in the keys mlx-lm reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..families import family_for
from .common import ConversionError

# Keys that only describe transformers' runtime, not the weights.
_DROP = (
    "rope_parameters", "layer_types", "_sliding_window_pattern", "transformers_version",
    "architectures_map", "_name_or_path", "auto_map", "output_attentions",
    "output_hidden_states", "return_dict", "use_cache", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "tie_encoder_decoder",
)


def read_hf_config(path: Path) -> dict:
    """The parsed ``config.json`` of a model folder.

    Raises:
        ConversionError: missing or invalid file.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConversionError(
            f"{path} has no config.json: give a Hugging Face model folder (config.json + weights)"
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{file} must hold a JSON object")
    return config


def _with_defaults(config: dict) -> dict:
    """``config`` completed with transformers' defaults for its model type."""
    try:
        from transformers import AutoConfig
    except ImportError:  # transformers comes with mlx-lm; stay usable without it
        return dict(config)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        full = AutoConfig.for_model(config["model_type"], **kwargs).to_dict()
    except (ValueError, KeyError, TypeError):
        return dict(config)
    full.update(config)  # what the file says wins over what transformers would rewrite
    return full


def _sliding_pattern(layer_types: list, hint) -> int:
    """The period ``p`` with layer ``i`` global iff ``i % p == p - 1`` (Gemma 3)."""
    n = len(layer_types)
    candidates = ([hint] if isinstance(hint, int) and hint > 0 else []) + list(range(1, n + 2))
    for p in candidates:
        expected = ["full_attention" if i % p == p - 1 else "sliding_attention" for i in range(n)]
        if list(layer_types) == expected:
            return p
    raise ConversionError(
        f"layer_types {layer_types} is not a repeating pattern of sliding layers followed by "
        f"one full-attention layer, which is the only Gemma 3 layout mlx-lm supports"
    )


def _rope(config: dict, params: dict) -> None:
    """Move one ``rope_parameters`` entry to mlx-lm's top-level keys."""
    if "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]
    if "partial_rotary_factor" in params:
        config["partial_rotary_factor"] = params["partial_rotary_factor"]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling.setdefault("type", kind)
        config["rope_scaling"] = scaling
    else:
        config["rope_scaling"] = None


def mlx_config(hf_config: dict) -> dict:
    """The mlx-lm ``config.json`` for a Hugging Face config.

    Raises:
        UnsupportedArchitectureError: a ``model_type`` the runtime cannot drive.
        ConversionError: a setting mlx-lm would silently ignore.
    """
    family_for(hf_config.get("model_type"))
    config = _with_defaults(hf_config)
    model_type = config["model_type"]
    rope = config.get("rope_parameters")
    if model_type == "gemma3_text":
        types = config.get("layer_types")
        if types:
            hint = hf_config.get("sliding_window_pattern", config.get("_sliding_window_pattern"))
            config["sliding_window_pattern"] = _sliding_pattern(types, hint)
        if isinstance(rope, dict) and "full_attention" in rope:
            _rope(config, rope["full_attention"])
            local = rope.get("sliding_attention", {})
            config["rope_local_base_freq"] = local.get(
                "rope_theta", config.get("rope_local_base_freq", 10000.0)
            )
    elif isinstance(rope, dict):
        _rope(config, rope)
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise ConversionError(
            f"{model_type} with use_sliding_window=true is not supported: mlx-lm would "
            f"ignore the window"
        )
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    for key in _DROP + ("dtype",):
        config.pop(key, None)
    return {k: v for k, v in config.items() if v is not None or k == "rope_scaling"}
