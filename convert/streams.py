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
* ``stream_adapters.{i}.down.weight``: ``(r, hidden)``,
  ``stream_adapters.{i}.up.weight``: ``(hidden, r)``, one pair per multi-stream
  layer ``i < stream_layers`` (optional: the stream adapters of
  ``reference.SpecStreamReference(stream_adapter_rank=r)``);
* ``base.<Hugging Face name>``: the base model (optional; ignored by
  ``--streams`` except to check its shapes against the converted base).

``specstream_config`` keys: ``gamma``, ``stream_layers``, ``mode``
(``lossless`` | ``shared``), and, to check that the streams belong to the base,
``hidden_size``, ``vocab_size``, ``num_layers``; ``stream_adapter_rank`` is
optional (it must agree with the tensors). Names of LoRA tensors (``*lora*``)
are refused: the runtime applies no LoRA at inference; merge it into the base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from .common import ConversionError
from .hf_weights import check_safetensors, import_torch, load_torch_file, torch_to_mx

CONFIG_KEY = "specstream_config"
STREAM_NAMES = ("stream_embeddings", "prune_adapter.down.weight", "prune_adapter.up.weight")
ADAPTER_NAME = re.compile(r"^stream_adapters\.(\d+)\.(down|up)\.weight$")


@dataclass
class StreamWeights:
    """Stream parameters from a PyTorch SS checkpoint.

    Attributes:
        tensors: ``stream_embeddings`` and (optionally) the ``prune_adapter.*`` and
            ``stream_adapters.*`` weights.
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

    @property
    def adapter_count(self) -> int:
        """Number of stream adapters (0: none)."""
        return sum(1 for k in self.tensors if k.startswith("stream_adapters.")) // 2

    @property
    def adapter_rank(self) -> int:
        """Rank of the stream adapters (0: none)."""
        down = self.tensors.get("stream_adapters.0.down.weight")
        return 0 if down is None else int(down.shape[0])


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
    lora = sorted(k for k in tensors if "lora" in k.lower())
    if lora:
        raise ConversionError(
            f"{file} holds LoRA tensors ({lora[0]}, ...), which the runtime does not apply; "
            f"merge base-weight LoRA into the base model before converting"
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
    streams = {k: v for k, v in tensors.items() if k in STREAM_NAMES or ADAPTER_NAME.match(k)}
    _check_adapters(file, streams, config)
    base = {k[len("base."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("base.")}
    return StreamWeights(streams, dict(config), base)


def _check_adapters(file: Path, tensors: dict, config: dict) -> None:
    """Stream adapters must be complete pairs ``0..n-1`` of one rank, ``n = stream_layers``."""
    found = {}
    for name in tensors:
        match = ADAPTER_NAME.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = tensors[name]
    rank = int(config.get("stream_adapter_rank", 0) or 0)
    if not found:
        if rank:
            raise ConversionError(
                f"{file}: specstream_config says stream_adapter_rank={rank} but the file holds "
                f"no stream_adapters.* tensors"
            )
        return
    count = len(found)
    layers = int(config.get("stream_layers", count))
    if sorted(found) != list(range(layers)) or any(len(pair) != 2 for pair in found.values()):
        raise ConversionError(
            f"{file}: stream adapters must come as stream_adapters.{{i}}.down/up.weight for "
            f"every multi-stream layer i = 0..{layers - 1}; found layers {sorted(found)}"
        )
    hidden = tensors["stream_embeddings"].shape[1]
    first = found[0]["down"].shape[0]
    for i, pair in found.items():
        down, up = pair["down"].shape, pair["up"].shape
        if down != (first, hidden) or up != (hidden, first):
            raise ConversionError(
                f"{file}: stream_adapters.{i} has down {down} / up {up}; expected "
                f"({first}, {hidden}) / ({hidden}, {first})"
            )
    if rank and rank != first:
        raise ConversionError(
            f"{file}: specstream_config says stream_adapter_rank={rank} but the adapters have "
            f"rank {first}"
        )


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
        "stream_adapter_rank": module.stream_adapter_rank,
        "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"], **(extra_config or {}),
    }
    torch.save({CONFIG_KEY: config, "state_dict": module.state_dict()}, str(path))
