"""The Speculative Streaming model: an mlx-lm model plus its stream parameters.

Decoding state (caches, masks, positions) never lives here: ``forward.forward``
takes it as arguments.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import install as install_attention
from .config import SpecStreamConfig
from .families import Family, layer_windows
from .rope import install_positional_rope


ADAPTER_EPS = 1e-6


class ResidualAdapter(nn.Module):
    """Rank-r residual adapter ``h -> h + rms(h) * up(silu(down(h / rms(h))))``.

    ``rms(h)`` is the row's root mean square (eps 1e-6, computed in float32);
    ``up`` starts at zero, so a fresh adapter is the identity. Both the input
    and the output are relative to the row's own scale: residual streams have
    an RMS of ~20 with a few "massive activation" features (SmolLM2: ~2e4 on
    the first token), and an adapter working in absolute units would need
    weights hundreds of times larger than its initialisation to matter, which
    a single learning rate cannot reach together with the rest.

    Used as the early-exit pruning head's adapter (an untrained one is the
    plain "logit lens" of layer ``N - Ns``) and as the stream adapters.
    """

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)

    def __call__(self, h: mx.array) -> mx.array:
        x = h.astype(mx.float32)
        rms = mx.sqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + ADAPTER_EPS)  # (..., 1)
        delta = self.up(nn.silu(self.down((x / rms).astype(h.dtype)))).astype(mx.float32) * rms
        return h + delta.astype(h.dtype)


class SpecStreamModel(nn.Module):
    """An mlx-lm model with ``gamma`` speculative streams in its top layers.

    Attributes:
        base: the mlx-lm model (its weights are the base or fine-tuned model).
        stream_embeddings: ``(gamma, hidden)`` table ``P``; stream ``j`` of a
            position enters layer ``N - Ns`` as ``h + P[j - 1]``.
        prune_adapter: the early-exit adapter used for tree pruning.
        stream_adapters: optional adapters applied to the stream rows (never
            the main rows) before each multi-stream layer; they add capacity to
            the drafts while lossless mode stays exact.
    """

    def __init__(self, base: nn.Module, config: SpecStreamConfig, family: Family) -> None:
        super().__init__()
        self.base = base
        self.stream_embeddings = mx.zeros((config.gamma, config.hidden_size))
        self.prune_adapter = ResidualAdapter(config.hidden_size, config.prune_rank)
        rank = config.stream_adapter_rank
        self.stream_adapters = [
            ResidualAdapter(config.hidden_size, rank) for _ in range(config.stream_layers if rank else 0)
        ]
        # Plain Python attributes: not parameters, not decoding state.
        self._config = config
        self._family = family
        self._windows = layer_windows(family, base)
        self._sharding = None  # (mode, group) when loaded across mlx.launch ranks
        self._owners = None  # pipeline: the rank that holds each layer
        self._medusa = None  # heads.MedusaHeads stored beside the checkpoint, if any (not a parameter)
        self._eagle = None  # eagle.EagleHead stored beside the checkpoint, if any (not a parameter)
        install_positional_rope(base.model.layers)
        install_attention(base)  # tree calls may take the fused kernel

    @property
    def config(self) -> SpecStreamConfig:
        return self._config

    @property
    def family(self) -> Family:
        return self._family

    @property
    def sharding(self):
        """``(mode, group)`` when the base is split across ranks (``load(..., shard=)``), else ``None``."""
        return self._sharding

    def set_sharding(self, mode: str, group, owners=None) -> None:
        """Record a sharded load; ``owners`` (pipeline): the rank holding each layer."""
        self._sharding = (mode, group)
        self._owners = owners

    @property
    def medusa(self):
        """The Medusa heads loaded with the checkpoint (``heads.py``), or ``None``."""
        return self._medusa

    def set_medusa(self, heads) -> None:
        self._medusa = heads

    @property
    def eagle(self):
        """The EAGLE-style head loaded with the checkpoint (``eagle.py``), or ``None``."""
        return self._eagle

    def set_eagle(self, head) -> None:
        self._eagle = head

    @property
    def layer_owners(self):
        """Pipeline runs: ``owners[i]`` is the rank that runs layer ``i``; else ``None``."""
        return self._owners

    @property
    def windows(self) -> list:
        return self._windows

    @property
    def layers(self) -> list:
        return self.base.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.base.model.layers)

    @property
    def first_stream_layer(self) -> int:
        """Index of the first multi-stream layer, ``N - Ns``."""
        return self.num_layers - self._config.stream_layers

    def stream_parameters(self) -> dict:
        """The parameters stored in ``specstream.safetensors`` (flat names)."""
        from mlx.utils import tree_flatten

        params = self.parameters()
        return dict(tree_flatten({k: params[k] for k in self.STREAM_KEYS if k in params}))

    #: Top-level parameter groups that belong to the streams (not the base).
    STREAM_KEYS = ("stream_embeddings", "prune_adapter", "stream_adapters")
