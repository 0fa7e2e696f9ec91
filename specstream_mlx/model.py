"""The Speculative Streaming model: an mlx-lm model plus its stream parameters.

Decoding state (caches, masks, positions) never lives here: ``forward.forward``
takes it as arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import install as install_attention
from .config import STREAM_LORA_SCALE, SpecStreamConfig
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


def _projections(layer: nn.Module) -> list:
    """``(path, module)`` of a decoder layer's dense projections (``nn.Linear`` or quantized).

    A projection already wrapped (``StreamRowsLinear``, from an earlier model over the
    same base) counts once, as its inner module.
    """
    modules = dict(layer.named_modules())
    wrapped = {path: m.inner for path, m in modules.items() if isinstance(m, StreamRowsLinear)}
    plain = {path: m for path, m in modules.items()
             if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and path.rpartition(".")[0] not in wrapped}
    return sorted({**plain, **wrapped}.items(), key=lambda item: item[0])


def _dims(linear: nn.Module) -> tuple:
    """``(out, in)`` of a linear or quantized linear layer."""
    out, packed = linear.weight.shape
    return out, packed * 32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else packed


def _walk(node, parts):
    """``node[parts[0]][parts[1]]...``: a module's child, or a nested parameter dict's entry."""
    for part in parts:
        node = node[part]
    return node


class StreamLoRA(nn.Module):
    """Low-rank updates of one multi-stream layer's projections, for stream rows only.

    For each projection (path ``p`` in the layer, e.g. ``self_attn.q_proj``) a pair
    ``a`` ``(in, r)`` and ``b`` ``(r, out)``, nested by path, so the flat names read
    ``stream_lora.<i>.self_attn.q_proj.a``. ``b`` starts at zero: a fresh update is nothing.
    """

    def __init__(self, layer: nn.Module, rank: int) -> None:
        super().__init__()
        for path, linear in _projections(layer):
            out, inp = _dims(linear)
            *parents, name = path.split(".")
            node = self
            for part in parents:
                if part not in node:
                    node[part] = {}
                node = node[part]
            node[name] = {"a": mx.zeros((inp, rank)), "b": mx.zeros((rank, out))}

    @property
    def paths(self) -> tuple:
        """The projections' paths in the layer, in parameter order."""
        return tuple(name[: -len(".a")] for name, _ in tree_flatten(self.parameters())
                     if name.endswith(".a"))

    def pair(self, path: str) -> dict:
        return _walk(self, path.split("."))


class _StreamRows:
    """Shared by a model's ``StreamRowsLinear`` wrappers (a plain object, not a parameter).

    ``start``: the first stream row of the multi-stream layer now running (``None``: the
    call has no stream rows). mlx-lm's layers call their projections with the rows alone,
    so the wrappers read the split from here; ``SpecStreamModel.stream_rows`` sets it.
    """

    def __init__(self, model: "SpecStreamModel") -> None:
        self.model = model
        self.start: Optional[int] = None


class StreamRowsLinear(nn.Module):
    """A multi-stream layer's projection plus its stream-row LoRA update.

    ``y = inner(x)`` on every row; rows ``start:`` (the stream rows) also get
    ``STREAM_LORA_SCALE * x a b``. The main rows' slice of ``y`` is ``inner``'s own
    output, untouched, so lossless decoding stays the base model's exactly.
    """

    def __init__(self, inner: nn.Module, rows: _StreamRows, layer: int, path: str) -> None:
        super().__init__()
        self.inner = inner
        self._rows, self._layer, self._path = rows, layer, path  # plain attributes

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)  # (..., L, out)
        start = self._rows.start
        if start is None or start >= x.shape[-2]:
            return y
        pair = self._rows.model.stream_lora[self._layer].pair(self._path)
        delta = (x[..., start:, :] @ pair["a"]) @ pair["b"] * STREAM_LORA_SCALE  # (..., L - start, out)
        return mx.concatenate([y[..., :start, :], y[..., start:, :] + delta.astype(y.dtype)], axis=-2)


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
        stream_lora: optional ``StreamLoRA`` per multi-stream layer: low-rank
            updates of its projections that only stream rows get (the layers'
            projections are wrapped in ``StreamRowsLinear``), more capacity of
            the same exact kind.
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
        self._rows = _StreamRows(self)
        self.stream_lora = []
        if config.stream_lora_rank:
            self._install_stream_lora(base, config)
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

    def _install_stream_lora(self, base: nn.Module, config: SpecStreamConfig) -> None:
        layers = base.model.layers
        first = len(layers) - config.stream_layers
        for k, layer in enumerate(layers[first:]):
            if layer is None:
                raise ValueError("stream LoRA needs every multi-stream layer on this process; "
                                 "load the model without --shard (pipeline) to use it")
            self.stream_lora.append(StreamLoRA(layer, config.stream_lora_rank))
            for path, linear in _projections(layer):
                *parents, name = path.split(".")
                setattr(_walk(layer, parents), name, StreamRowsLinear(linear, self._rows, k, path))

    @contextmanager
    def stream_rows(self, start: Optional[int]):
        """Within: the multi-stream layers' rows ``start:`` are stream rows (``None``: none).

        Only the stream-row LoRA reads it; layers without it ignore it.
        """
        previous, self._rows.start = self._rows.start, start
        try:
            yield
        finally:
            self._rows.start = previous

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
        params = self.parameters()
        return dict(tree_flatten({k: params[k] for k in self.STREAM_KEYS if k in params}))

    #: Top-level parameter groups that belong to the streams (not the base).
    STREAM_KEYS = ("stream_embeddings", "prune_adapter", "stream_adapters", "stream_lora")
