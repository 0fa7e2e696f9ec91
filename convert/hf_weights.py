"""Read the weights of a Hugging Face model folder into MLX arrays.

Formats: ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, and PyTorch ``pytorch_model.bin`` (sharded
too). Reading ``.bin`` files needs torch (``pip install "specstream-mlx[torch]"``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx

from ..config import WEIGHTS_FILE
from .common import ConversionError

TORCH_HINT = 'install torch: pip install "specstream-mlx[torch]"'


def import_torch():
    """``torch``, or a ``ConversionError`` with the install hint."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"this needs PyTorch, which is not installed; {TORCH_HINT}") from None
    return torch


def _from_index(path: Path, index_name: str) -> List[Path]:
    index = path / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{index} is not a valid weight index ({exc})") from None
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(
            f"{index} lists shards that are missing from {path}: {', '.join(missing)}; "
            f"download the complete model"
        )
    return files


def weight_files(path: Path) -> Tuple[str, List[Path]]:
    """``("safetensors" | "torch", files)`` holding the weights of a model folder.

    Raises:
        ConversionError: no weights, or an index naming missing shards.
    """
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return "safetensors", _from_index(path, "model.safetensors.index.json")
    files = sorted(p for p in path.glob("*.safetensors") if p.name != WEIGHTS_FILE)
    if files:
        return "safetensors", files
    if (path / "pytorch_model.bin.index.json").is_file():
        return "torch", _from_index(path, "pytorch_model.bin.index.json")
    files = sorted(path.glob("*.bin")) or sorted(path.glob("*.pt")) or sorted(path.glob("*.pth"))
    if files:
        return "torch", files
    raise ConversionError(
        f"{path} holds no weights (*.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin): give a complete Hugging Face model folder"
    )


def check_safetensors(file: Path) -> None:
    """Check a safetensors header and that the file holds all the bytes it declares.

    Raises:
        ConversionError: unreadable header or a truncated file.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{file} is truncated or not a safetensors file (size {size})")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ConversionError(f"{file} is truncated or not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{file} is corrupt: its safetensors header is not JSON") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + length + max(ends, default=0)
    if need > size:
        raise ConversionError(
            f"{file} is truncated: it declares {need} bytes but has {size}; download it again"
        )


def torch_to_mx(tensor) -> mx.array:
    """A CPU torch tensor as an MLX array of the same dtype (bfloat16 kept exactly)."""
    torch = import_torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy()
        return mx.array(bits).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_torch_file(file: Path) -> dict:
    """``torch.load`` a checkpoint safely (tensors only, no pickled code)."""
    torch = import_torch()
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(f"could not read {file} as a PyTorch checkpoint ({reason})") from None


def _torch_state(file: Path) -> Dict[str, mx.array]:
    torch = import_torch()
    state = load_torch_file(file)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{file} does not hold a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{file}: entry {name!r} is not a tensor")
        out[name] = torch_to_mx(value)
    return out


def read_weights(path: Path) -> Dict[str, mx.array]:
    """All tensors of a model folder by their Hugging Face names.

    Raises:
        ConversionError: missing, truncated or unreadable files.
    """
    kind, files = weight_files(path)
    weights: Dict[str, mx.array] = {}
    for file in files:
        if kind == "safetensors":
            check_safetensors(file)
            try:
                part = mx.load(str(file))
            except Exception as exc:
                raise ConversionError(f"could not read {file} ({exc})") from None
        else:
            part = _torch_state(file)
        clash = set(part) & set(weights)
        if clash:
            raise ConversionError(f"{file} repeats tensors of another shard: {sorted(clash)[:3]}")
        weights.update(part)
    return weights

