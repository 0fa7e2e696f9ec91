"""An EAGLE-style draft head: one decoder layer that drafts features autoregressively.

EAGLE (Li et al. 2024) drafts at the feature level. At position ``i`` its input
is the base model's final feature ``f_i`` together with the embedding of the
token that follows, ``x_{i+1}``: ``fc([f_i ; e(x_{i+1})])`` (``2H -> H``). One
decoder layer of the base model's own kind (its own weights) turns that into a
prediction of ``f_{i+1}``, and the base model's LM head turns the predicted
feature into the distribution of ``x_{i+2}``. A drafted token's predicted
feature is the input of the next depth, so each depth knows the guess before
it. Speculative Streaming's streams and Medusa's heads do not: stream ``j``
and head ``j`` guess ``j`` tokens ahead blind to the guesses between. The base
stays frozen, so output stays the base model's (verification is unchanged).

Features here are the final *normed* hidden states (``ForwardOutput.main_hidden``,
what the LM head reads). EAGLE uses the top layer's output before the norm;
with the norm folded in, the predicted feature goes to the LM head directly.

Files, beside a checkpoint's own::

    eagle.json           {"kind": "eagle", "hidden_size", "vocab_size", "num_layers", "model_type"}
    eagle.safetensors    fc.weight (H, 2H), fc.bias (H,), layer.* (one decoder layer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import LayerCache, StepView, rope_offset
from .config import CheckpointError
from .families import embed, lm_head
from .heads import load_head_files, save_head_files
from .rope import install_positional_rope

EAGLE_CONFIG = "eagle.json"
EAGLE_WEIGHTS = "eagle.safetensors"


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    vocab_size: int
    num_layers: int
    model_type: str
    kind: str = "eagle"


class EagleHead(nn.Module):
    """``fc`` plus one decoder layer built like the base model's layers.

    ``__call__(features, tokens, mask, cache, offset)``: ``(1, L, H)`` features and
    ``(1, L)`` next tokens -> ``(1, L, H)`` predicted next features.
    """

    def __init__(self, base: nn.Module, config: EagleConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden)
        try:
            # (a pipeline stage holds only some layers: the others are None)
            self.layer = type(next(x for x in base.model.layers if x is not None))(base.args)
        except TypeError as exc:
            raise CheckpointError(f"an EAGLE head needs a decoder layer built from the model's args; "
                                  f"{config.model_type} layers take other arguments ({exc})") from None
        install_positional_rope([self.layer])
        self._config = config

    @property
    def config(self) -> EagleConfig:
        return self._config

    def __call__(self, base, family, features: mx.array, tokens: mx.array, mask, cache: LayerCache,
                 positions: np.ndarray) -> mx.array:
        x = self.fc(mx.concatenate([features, embed(family, base, tokens).astype(features.dtype)], axis=-1))
        return self.layer(x, mask, cache=StepView(cache, rope_offset(cache.length, positions)))

    def logits(self, base, predicted: mx.array) -> mx.array:
        return lm_head(base, predicted)


def eagle_config_for(base: nn.Module) -> EagleConfig:
    args = base.args
    return EagleConfig(args.hidden_size, args.vocab_size, len(base.model.layers), args.model_type)


def save_eagle(head: EagleHead, directory: Path) -> None:
    """Write ``eagle.json`` and ``eagle.safetensors`` into ``directory`` (each atomically)."""
    save_head_files(head, head.config, directory, EAGLE_CONFIG, EAGLE_WEIGHTS)


def load_eagle(directory: Path, base: nn.Module) -> Optional[EagleHead]:
    """The EAGLE head stored beside a checkpoint, or ``None`` when it has none.

    Raises:
        CheckpointError: see ``heads.load_head_files``.
    """
    return load_head_files(directory, base, EAGLE_CONFIG, EAGLE_WEIGHTS, EagleConfig,
                           lambda c: eagle_config_for(base),
                           ("hidden_size", "vocab_size", "num_layers", "model_type"),
                           lambda c: EagleHead(base, c), "EAGLE head")
