"""PyTorch SS checkpoints: reading the stream parameters trained in PyTorch.

A *PyTorch SS checkpoint* is either

* a file ``torch.save`` wrote (``.pt``, ``.pth``, ``.bin``) holding
  ``{"specstream_config": {...}, "state_dict": {...}}`` or a bare state dict, or
* a ``.safetensors`` file whose ``__metadata__`` has a ``specstream_config``
  entry (a JSON string).

Tensor names (those of ``reference.SpecStreamReference.state_dict()``):

* ``stream_embeddings``: ``(gamma, hidden)`` (required);
* ``prune_adapter.down.weight``: ``(rank, hidden)``,
  ``prune_adapter.up.weight``: ``(hidden, rank)`` (optional: a fresh adapter is
  made when absent, which is the plain early exit);
* ``base.<Hugging Face name>``: the base model (optional; ignored by
  ``--streams`` except to check its shapes against the converted base).

``specstream_config`` keys: ``gamma``, ``stream_layers``, ``mode``
(``lossless`` | ``shared``), and, to check that the streams belong to the base,
``hidden_size``, ``vocab_size``, ``num_layers``. Names of stream LoRA
adapters (``*lora*``) are refused for now: the runtime does not apply them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from .common import ConversionError
from .hf_weights import check_safetensors, import_torch, load_torch_file, torch_to_mx

CONFIG_KEY = "specstream_config"
STREAM_NAMES = ("stream_embeddings", "prune_adapter.down.weight", "prune_adapter.up.weight")


@dataclass
class StreamWeights:
    """Stream parameters from a PyTorch SS checkpoint.

    Attributes:
        tensors: ``stream_embeddings`` and (optionally) the ``prune_adapter.*`` weights.
        config: the checkpoint's ``specstream_config`` (may be empty).
        base_shapes: shapes of ``base.*`` tensors, by Hugging Face name.
    """

    tensors: Dict[str, mx.array]
    config: dict = field(default_factory=dict)
    base_shapes: Dict[str, tuple] = field(default_factory=dict)

    @property
    def gamma(self) -> int:
        return int(self.tensors["stream_embeddings"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.tensors["stream_embeddings"].shape[1])


def _read_safetensors(file: Path):
    check_safetensors(file)
    try:
        tensors, meta = mx.load(str(file), return_metadata=True)
    except Exception as exc:
        raise ConversionError(f"could not read {file} ({exc})") from None
    config = {}
    if CONFIG_KEY in meta:
        try:
            config = json.loads(meta[CONFIG_KEY])
        except json.JSONDecodeError:
            raise ConversionError(f"{file}: metadata {CONFIG_KEY} is not JSON") from None
    return dict(tensors), config


def _read_torch(file: Path):
    torch = import_torch()
    data = load_torch_file(file)
    if not isinstance(data, dict):
        raise ConversionError(f"{file} holds a {type(data).__name__}, not a state dict")
    config = data.get(CONFIG_KEY, {})
    state = data.get("state_dict", data)
    tensors = {k: torch_to_mx(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, config if isinstance(config, dict) else {}


def read_streams(path) -> StreamWeights:
    """Read a PyTorch SS checkpoint (see the module docstring).

    Raises:
        ConversionError: missing file, no ``stream_embeddings``, bad shapes, stream LoRA.
    """
    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"streams file {file} does not exist")
    if file.suffix == ".safetensors":
        tensors, config = _read_safetensors(file)
    else:
        tensors, config = _read_torch(file)
    lora = sorted(k for k in tensors if "lora" in k.lower() or k.startswith("stream_adapters"))
    if lora:
        raise ConversionError(
            f"{file} holds stream LoRA / stream adapter tensors ({lora[0]}, ...), which the "
            f"converter cannot carry over yet; merge base-weight LoRA into the base model "
            f"before converting"
        )
    if "stream_embeddings" not in tensors:
        raise ConversionError(
            f"{file} has no 'stream_embeddings' tensor: it is not a PyTorch SS checkpoint "
            f"(names: {sorted(tensors)[:5]})"
        )
    table = tensors["stream_embeddings"]
    if table.ndim != 2:
        raise ConversionError(f"{file}: stream_embeddings must be (gamma, hidden), got {table.shape}")
    if "gamma" in config and int(config["gamma"]) != table.shape[0]:
        raise ConversionError(
            f"{file}: specstream_config says gamma={config['gamma']} but stream_embeddings "
            f"has {table.shape[0]} rows"
        )
    streams = {k: v for k, v in tensors.items() if k in STREAM_NAMES}
    base = {k[len("base."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("base.")}
    return StreamWeights(streams, dict(config), base)


def check_fits(streams: StreamWeights, hidden: int, vocab: int, layers: int, where: str) -> None:
    """Raise ``ConversionError`` unless the streams were made for this base model."""
    cfg = streams.config
    checks = [("hidden size", streams.hidden_size, hidden)]
    if "hidden_size" in cfg:
        checks.append(("hidden size", int(cfg["hidden_size"]), hidden))
    if "vocab_size" in cfg:
        checks.append(("vocabulary size", int(cfg["vocab_size"]), vocab))
    if "num_layers" in cfg:
        checks.append(("layer count", int(cfg["num_layers"]), layers))
    embed = streams.base_shapes.get("model.embed_tokens.weight")
    if embed is not None:
        checks.append(("vocabulary size", embed[0], vocab))
    for name, have, want in checks:
        if have != want:
            raise ConversionError(
                f"the streams in {where} were trained for a base model with {name} {have}, "
                f"but the base model being converted has {want}: they do not belong together"
            )
    rank_down = streams.tensors.get("prune_adapter.down.weight")
    if rank_down is not None and rank_down.shape[1] != hidden:
        raise ConversionError(f"{where}: prune_adapter.down.weight does not fit hidden size {hidden}")


def save_torch_checkpoint(module, path, extra_config: Optional[dict] = None) -> None:
    """Write a ``SpecStreamReference`` as a PyTorch SS checkpoint (``torch.save``)."""
    torch = import_torch()
    cfg = module.cfg
    config = {
        "gamma": module.gamma, "stream_layers": module.stream_layers, "mode": module.mode,
        "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"], **(extra_config or {}),
    }
    torch.save({CONFIG_KEY: config, "state_dict": module.state_dict()}, str(path))
