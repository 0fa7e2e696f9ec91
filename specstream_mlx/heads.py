"""Medusa heads: the peer method with extra heads on the base model's last hidden state.

Medusa (Cai et al. 2024) drafts from ``K`` heads on the final (normed) hidden
state of the last accepted token: head ``k`` (1-based) predicts the token
``k + 1`` places ahead, one further than the base model's own next token. Each
head is a residual block ``h + SiLU(W h + b)`` followed by the base model's LM
head (shared, as the issue asks; Medusa-1 trains a copy per head). With the base
frozen the output is the base model's (Medusa-1, lossless here); the drafts
arrange into the same trees as the streams' (``drafters.MedusaDrafter``).

Files, beside a checkpoint's own (the streams are untouched)::

    medusa.json           {"kind": "medusa", "num_heads", "hidden_size", "vocab_size", "num_layers"}
    medusa.safetensors    blocks.<k>.linear.weight (H, H), blocks.<k>.linear.bias (H,)

Extra parameters: ``K * (H * H + H)`` (1.0M for SmolLM2-135M with 3 heads,
against ~1.7K stream embeddings for its shared-mode streams).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .atomic import atomic_file
from .config import CheckpointError
from .families import lm_head

HEADS_CONFIG = "medusa.json"
HEADS_WEIGHTS = "medusa.safetensors"


@dataclass(frozen=True)
class HeadsConfig:
    num_heads: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    kind: str = "medusa"

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {self.num_heads}")


class ResBlock(nn.Module):
    """``h + SiLU(W h + b)``; ``W = 0`` at the start, so a fresh head is the identity."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.linear.weight = mx.zeros((hidden, hidden))
        self.linear.bias = mx.zeros((hidden,))

    def __call__(self, h: mx.array) -> mx.array:
        return h + nn.silu(self.linear(h))


class MedusaHeads(nn.Module):
    """``K`` residual blocks; ``hidden(h)`` maps ``(..., H)`` to ``(..., K, H)``."""

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.blocks = [ResBlock(config.hidden_size) for _ in range(config.num_heads)]
        self._config = config

    @property
    def config(self) -> HeadsConfig:
        return self._config

    def hidden(self, h: mx.array) -> mx.array:
        return mx.stack([block(h) for block in self.blocks], axis=-2)

    def logits(self, base: nn.Module, h: mx.array) -> mx.array:
        """Head logits through the base model's LM head. ``(..., H) -> (..., K, V)``."""
        return lm_head(base, self.hidden(h))


def heads_config_for(base: nn.Module, num_heads: int) -> HeadsConfig:
    args = base.args
    return HeadsConfig(num_heads, args.hidden_size, args.vocab_size, len(base.model.layers))


def save_head_files(module: nn.Module, config, directory: Path, config_name: str, weights_name: str) -> None:
    """Write a draft head's config (a dataclass) and weights (float32) beside a checkpoint,
    each file atomically. Shared by the Medusa heads and the EAGLE head (``eagle.py``)."""
    from mlx.utils import tree_flatten

    directory = Path(directory)
    with atomic_file(directory / weights_name) as tmp:
        target = tmp.with_suffix(".safetensors")  # mx.save_safetensors insists on the suffix
        mx.save_safetensors(str(target), {k: v.astype(mx.float32) for k, v in tree_flatten(module.parameters())},
                            metadata={"format": "mlx"})
        target.replace(tmp)
    with atomic_file(directory / config_name) as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_head_files(directory: Path, base: nn.Module, config_name: str, weights_name: str, config_class,
                    expected, fields, build, what: str):
    """A draft head stored beside a checkpoint (``save_head_files``), or ``None`` without one.

    ``expected(config)`` is the config the base model calls for; the ``fields`` must agree.
    ``build(config)`` makes the module the weights go into (cast to the base's dtype).

    Raises:
        CheckpointError: only one of the two files, a bad config, a config made for another
            base model (naming the field), corrupt weights or weights of other shapes.
    """
    from mlx.utils import tree_flatten, tree_unflatten

    directory = Path(directory)
    config_file, weights_file = directory / config_name, directory / weights_name
    if not config_file.exists() and not weights_file.exists():
        return None
    if not (config_file.is_file() and weights_file.is_file()):
        raise CheckpointError(f"{directory} has only one of {config_name} and {weights_name}: "
                              f"copy both, or delete the one left (then the model has no {what})")
    try:
        config = config_class(**json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not a config of {what} ({exc})") from None
    want_config = expected(config)
    for name in fields:
        if getattr(config, name) != getattr(want_config, name):
            raise CheckpointError(
                f"{config_file} was made for a base model with {name.replace('_', ' ')} "
                f"{getattr(config, name)}, but this model has {getattr(want_config, name)}: the {what} "
                "do not belong to this model")
    module = build(config)
    try:
        weights = mx.load(str(weights_file))
    except Exception as exc:
        raise CheckpointError(f"{weights_file} is corrupt or not safetensors ({exc})") from None
    want = dict(tree_flatten(module.parameters()))
    if set(weights) != set(want) or any(weights[k].shape != want[k].shape for k in want):
        raise CheckpointError(f"{weights_file} does not match {config_file} and the base model's shapes")
    dtype = base.model.norm.weight.dtype
    module.update(tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items()]))
    mx.eval(module.parameters())
    return module


def save_heads(heads: MedusaHeads, directory: Path) -> None:
    """Write ``medusa.json`` and ``medusa.safetensors`` into ``directory`` (each atomically)."""
    save_head_files(heads, heads.config, directory, HEADS_CONFIG, HEADS_WEIGHTS)


def load_heads(directory: Path, base: nn.Module) -> Optional[MedusaHeads]:
    """The Medusa heads stored beside a checkpoint, or ``None`` when it has none.

    Raises:
        CheckpointError: see ``load_head_files``.
    """
    return load_head_files(directory, base, HEADS_CONFIG, HEADS_WEIGHTS, HeadsConfig,
                           lambda c: heads_config_for(base, c.num_heads),
                           ("hidden_size", "vocab_size", "num_layers"), MedusaHeads, "Medusa heads")
