"""A PyTorch reference of the Speculative Streaming model.

``SpecStreamReference`` computes the multi-stream forward of docs/design.md from the
same weights as the MLX runtime: the base model's Hugging Face tensors, the
stream embeddings ``P`` and the early-exit pruning adapter. It is the numerical
reference for conversion parity and for the Core ML export, and its
``state_dict`` defines a *PyTorch SS checkpoint* (see ``streams.py``):

* ``base.<Hugging Face name>``: the base model (``base.model.layers.0.self_attn.q_proj.weight``...);
* ``stream_embeddings``: ``(gamma, hidden)``;
* ``prune_adapter.down.weight``: ``(rank, hidden)``; ``prune_adapter.up.weight``: ``(hidden, rank)``;
* ``stream_adapters.{i}.down.weight``: ``(r, hidden)``, ``stream_adapters.{i}.up.weight``:
  ``(hidden, r)`` for ``i < Ns`` (only when the model has stream adapters).

Supported families: llama, mistral, qwen2, qwen3, phi3, gemma, gemma3_text
(default RoPE only). Everything runs on full sequences (no KV cache): prefix
rows and tree rows are given together with their mask and positions.
Needs torch (``pip install "specstream-mlx[torch]"``).
"""

from __future__ import annotations

import math
from typing import Tuple

from .hf_weights import import_torch

torch = import_torch()
nn = torch.nn
F = torch.nn.functional


class RMSNorm(nn.Module):
    """RMS norm as transformers computes it; Gemma scales by ``1 + weight``."""

    def __init__(self, dim: int, eps: float, offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)


def _rotate(x, cos, sin, rot_dim: int):
    """Rotate-half RoPE on the first ``rot_dim`` features. ``x: (H, L, D)``, ``cos: (L, rot/2)``."""
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]
    c = torch.cat([cos, cos], -1).to(x.dtype)
    s = torch.cat([sin, sin], -1).to(x.dtype)
    turned = torch.cat([-x2, x1], -1)
    return torch.cat([rot * c + turned * s, rest], -1)


class Attention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        kind = cfg["model_type"]
        hidden, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or hidden // self.heads
        self.fused = kind == "phi3"
        bias = cfg.get("attention_bias", kind == "qwen2")
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            self.qkv_proj = nn.Linear(hidden, q + 2 * kv, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q, bias=bias)
            self.k_proj = nn.Linear(hidden, kv, bias=bias)
            self.v_proj = nn.Linear(hidden, kv, bias=bias)
        self.o_proj = nn.Linear(q, hidden, bias=kind != "qwen2" and bias)
        if kind in ("qwen3", "gemma3_text"):
            eps, offset = cfg["rms_norm_eps"], kind == "gemma3_text"
            self.q_norm = RMSNorm(self.head_dim, eps, offset)
            self.k_norm = RMSNorm(self.head_dim, eps, offset)
        scalar = cfg.get("query_pre_attn_scalar") if kind == "gemma3_text" else None
        self.scale = (scalar or self.head_dim) ** -0.5
        self.rot_dim = int(self.head_dim * cfg.get("partial_rotary_factor", 1.0))

    def forward(self, x, rope: Tuple, mask):
        """``x: (L, hidden)``, ``mask: (L, L)`` bool (True = may attend)."""
        length = x.shape[0]
        if self.fused:
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(length, self.heads, self.head_dim).transpose(0, 1)  # (H, L, D)
        k = k.view(length, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(length, self.kv_heads, self.head_dim).transpose(0, 1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = _rotate(q, cos, sin, self.rot_dim), _rotate(k, cos, sin, self.rot_dim)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = (q @ k.transpose(1, 2)).float() * self.scale  # (H, L, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, -1).to(v.dtype) @ v  # (H, L, D)
        return self.o_proj(out.transpose(0, 1).reshape(length, -1))


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        kind, hidden, inner = cfg["model_type"], cfg["hidden_size"], cfg["intermediate_size"]
        self.fused = kind == "phi3"
        bias = bool(cfg.get("mlp_bias", False))
        if self.fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
            self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        # transformers reads hidden_activation for Gemma 3 and hidden_act otherwise
        first, second = ("hidden_activation", "hidden_act") if kind == "gemma3_text" else (
            "hidden_act", "hidden_activation")
        self.act = cfg.get(first) or cfg.get(second) or "silu"
        if self.act not in _ACTIVATIONS:
            raise NotImplementedError(f"the PyTorch reference has no activation {self.act!r}")

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_ACTIVATIONS[self.act](gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        eps, self.gemma3 = cfg["rms_norm_eps"], cfg["model_type"] == "gemma3_text"
        offset = cfg["model_type"] in ("gemma", "gemma3_text")
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps, offset)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps, offset)
        if self.gemma3:
            self.pre_feedforward_layernorm = RMSNorm(cfg["hidden_size"], eps, offset)
            self.post_feedforward_layernorm = RMSNorm(cfg["hidden_size"], eps, offset)

    def forward(self, h, rope, mask):
        if self.gemma3:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, mask))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + self.self_attn(self.input_layernorm(h), rope, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """The ``model.`` part of a Hugging Face causal LM (names match its state dict)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        offset = cfg["model_type"] in ("gemma", "gemma3_text")
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"], offset)


class BaseLM(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.model = Decoder(cfg)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def head(self, h):
        return h @ self.model.embed_tokens.weight.T if self.tied else self.lm_head(h)


class ResidualAdapter(nn.Module):
    """``h -> h + rms(h) * up(silu(down(h / rms(h))))`` (``up`` starts at zero), as ``model.ResidualAdapter``.

    ``rms`` (eps 1e-6) is computed on ``h / max|h|`` so float16 never overflows.

    The early-exit pruning adapter and the stream adapters have this form.
    """

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h):
        peak = h.abs().amax(-1, keepdim=True).clamp(min=1e-2)
        scaled = h / peak
        rms = peak * torch.sqrt(scaled.pow(2).mean(-1, keepdim=True) + 1e-6 / peak.pow(2))
        return h + self.up(F.silu(self.down(h / rms))) * rms


PruneAdapter = ResidualAdapter  # the name this class had first


def _check_rope(cfg: dict) -> None:
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in (None, "default"):
        raise NotImplementedError(
            f"the PyTorch reference implements default RoPE only, not rope_scaling={scaling}"
        )


def msa_mask(mask, stream_nodes, gamma: int):
    """The multi-stream attention mask over main rows then stream rows.

    Args:
        mask: ``(L, L)`` bool visibility among main rows (causal, or a tree).
        stream_nodes: ``(S,)`` main rows that get ``gamma`` stream rows each;
            stream ``j`` of ``stream_nodes[s]`` is row ``L + s * gamma + j - 1``.
        gamma: streams per node. Main rows never see stream rows (either mode).

    Returns:
        ``(L + S*gamma, L + S*gamma)`` bool.
    """
    length, count = mask.shape[0], stream_nodes.shape[0]
    size = length + count * gamma
    full = torch.zeros(size, size, dtype=torch.bool)
    full[:length, :length] = mask
    own = torch.tril(torch.ones(gamma, gamma, dtype=torch.bool))
    for slot, node in enumerate(stream_nodes.tolist()):
        lo = length + slot * gamma
        full[lo : lo + gamma, :length] = mask[node]
        full[lo : lo + gamma, lo : lo + gamma] = own
    return full


class SpecStreamReference(nn.Module):
    """The Speculative Streaming forward in plain PyTorch.

    Args:
        config: the mlx-lm style config of the base model
            (``specstream_mlx.convert.hf_config.mlx_config`` of a HF config).
        gamma: number of streams; stream_layers: ``Ns``; mode: lossless|shared;
        prune_rank: rank of the pruning adapter.
        stream_adapter_rank: rank of the stream adapters (0: none), one per
            multi-stream layer, applied to the stream rows before that layer.
    """

    def __init__(self, config: dict, gamma: int = 3, stream_layers: int = 4,
                 mode: str = "lossless", prune_rank: int = 8,
                 stream_adapter_rank: int = 0) -> None:
        super().__init__()
        _check_rope(config)
        self.cfg = dict(config)
        self.gamma, self.stream_layers, self.mode = gamma, stream_layers, mode
        self.base = BaseLM(config)
        hidden = config["hidden_size"]
        self.stream_embeddings = nn.Parameter(torch.zeros(gamma, hidden))
        self.prune_adapter = ResidualAdapter(hidden, prune_rank)
        self.stream_adapter_rank = stream_adapter_rank
        self.stream_adapters = nn.ModuleList(
            ResidualAdapter(hidden, stream_adapter_rank)
            for _ in range(stream_layers if stream_adapter_rank else 0)
        )
        self.split = config["num_hidden_layers"] - stream_layers
        head_dim = self.base.model.layers[0].self_attn.head_dim
        self.rot_dim = self.base.model.layers[0].self_attn.rot_dim
        self.theta = config.get("rope_theta", 10000.0)
        self.local_theta = config.get("rope_local_base_freq", self.theta)
        self.windows = self._windows()
        self.embed_scale = math.sqrt(hidden) if config["model_type"].startswith("gemma") else None
        assert self.rot_dim <= head_dim

    def _windows(self):
        cfg, n = self.cfg, self.cfg["num_hidden_layers"]
        if cfg["model_type"] == "gemma3_text":
            p = cfg.get("sliding_window_pattern", 6)
            return [None if i % p == p - 1 else cfg["sliding_window"] for i in range(n)]
        return [None] * n

    def _rope(self, positions, theta: float):
        inv = 1.0 / theta ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float32) / self.rot_dim)
        angles = positions.float()[:, None] * inv[None, :]  # (L, rot/2)
        return angles.cos(), angles.sin()

    def _layers(self, h, ids, positions, mask, n_main=None):
        """Run layers ``ids``; with ``n_main``, rows from ``n_main`` on are stream rows."""
        ropes = {}
        for i in ids:
            if n_main is not None and len(self.stream_adapters) and h.shape[0] > n_main:
                adapter = self.stream_adapters[i - self.split]
                h = torch.cat([h[:n_main], adapter(h[n_main:])])
            window = self.windows[i]
            theta = self.local_theta if window is not None else self.theta
            if theta not in ropes:
                ropes[theta] = self._rope(positions, theta)
            layer_mask = mask
            if window is not None:
                layer_mask = mask & ((positions[:, None] - positions[None, :]) < window)
            h = self.base.model.layers[i](h, ropes[theta], layer_mask)
        return h

    def embed(self, tokens):
        h = self.base.model.embed_tokens(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        return h

    def logits(self, hidden):
        """LM-head logits of final-norm hidden states. ``(..., H) -> (..., V)``."""
        out = self.base.head(hidden)
        cap = self.cfg.get("final_logit_softcapping")
        return torch.tanh(out / cap) * cap if cap else out

    def forward(self, tokens, positions=None, mask=None, stream_nodes=None):
        """One multi-stream forward over a whole sequence.

        Args:
            tokens: ``(L,)`` token ids of the main rows.
            positions: ``(L,)`` RoPE positions (default ``0..L-1``).
            mask: ``(L, L)`` bool visibility among main rows (default causal).
            stream_nodes: ``(S,)`` rows that draft through the streams (default none).

        Returns:
            ``(main_logits (L, V), stream_logits (S, gamma, V) or None, exit_hidden (L, H))``;
            ``exit_hidden`` is the input of layer ``N - Ns`` (for early-exit pruning).
        """
        length = tokens.shape[0]
        if positions is None:
            positions = torch.arange(length)
        if mask is None:
            mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
        if stream_nodes is None:
            stream_nodes = torch.zeros(0, dtype=torch.long)
        n_layers = len(self.base.model.layers)
        h = self._layers(self.embed(tokens), range(self.split), positions, mask)
        exit_hidden = h
        count = stream_nodes.shape[0]
        if count:
            streams = h[stream_nodes][:, None, :] + self.stream_embeddings.to(h.dtype)  # (S, g, H)
            h = torch.cat([h, streams.reshape(count * self.gamma, -1)])
            offsets = torch.arange(1, self.gamma + 1)
            positions = torch.cat([positions, (positions[stream_nodes][:, None] + offsets).reshape(-1)])
            mask = msa_mask(mask, stream_nodes, self.gamma)
        h = self._layers(h, range(self.split, n_layers), positions, mask, n_main=length)
        h = self.base.model.norm(h)
        main = self.logits(h[:length])
        streams = self.logits(h[length:]).reshape(count, self.gamma, -1) if count else None
        return main, streams, exit_hidden

    def exit_logits(self, exit_hidden):
        """Early-exit logits used for tree pruning. ``(L, H) -> (L, V)``."""
        return self.logits(self.base.model.norm(self.prune_adapter(exit_hidden)))

    def load_base(self, hf_state: dict) -> None:
        """Load the base model from a Hugging Face state dict (tied heads may be absent)."""
        state = {k: v for k, v in hf_state.items() if "rotary_emb" not in k}
        if self.base.tied:
            state.pop("lm_head.weight", None)
        self.base.load_state_dict(state, strict=True)
