"""The PyTorch module that becomes the Core ML program: one step of the decode loop.

``StepModule`` wraps a ``convert.reference.SpecStreamReference`` (its weights and
layers) and adds what a stateful, fixed-shape program needs (``interface.json``
describes the calling convention):

1. **commit**: ``K`` in-order slot copies in the key/value state (the previous
   call's accepted path gathered to the front of its pending rows);
2. **write**: the keys/values of the ``T`` main rows of this call go to slots
   ``write_start .. write_start + T - 1`` of the state, for every layer;
3. **forward**: the lower ``N - Ns`` layers attend over all ``C`` cache slots
   under the additive ``attention_mask``; at layer ``N - Ns`` every row gets
   ``G`` stream rows ``h + P[j]`` (stream adapters before each multi-stream
   layer), which attend to the cache slots their row sees and to the earlier
   streams of the same row (the MSA mask is built in the graph from the input
   mask); stream rows are never written to the state.

RMS norms are computed as ``s * rsqrt(mean(s^2) + eps / m^2)`` with
``s = x / m``, ``m = max |x|``: the same value, but it cannot overflow in
float16 (SmolLM2's residual stream reaches ~2.5e4, whose square does not fit).
With ``compute_dtype=float16`` (weights in float16, no float32 upcasts) the
module emulates the package's float16 arithmetic on the CPU.

Shapes in comments: ``T`` rows, ``C`` slots, ``G`` streams, ``H`` hidden,
``KV`` key/value heads, ``D`` head dim. The graph depends on ``T`` only through
tensor shapes, so one trace serves every enumerated size.
"""

from __future__ import annotations

from .. import coreml
from . import interface

torch = coreml.require_torch()
nn = torch.nn
F = torch.nn.functional


def rms_norm(norm, x):
    """``norm`` (a reference ``RMSNorm``) applied to ``x`` without float16 overflow. ``(..., H)``."""
    peak = x.abs().amax(-1, keepdim=True).clamp(min=1e-2)  # (..., 1)
    scaled = x / peak
    y = scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + norm.eps / peak.pow(2))
    weight = 1.0 + norm.weight if norm.offset else norm.weight
    return y * weight.to(x.dtype)


def _rotate(x, cos, sin, rot_dim: int):
    """Rotate-half RoPE on the first ``rot_dim`` features. ``x: (heads, R, D)``, ``cos: (R, rot/2)``."""
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    c = torch.cat([cos, cos], -1)
    s = torch.cat([sin, sin], -1)
    return torch.cat([rot * c + torch.cat([-x2, x1], -1) * s, rest], -1)


class StepModule(nn.Module):
    """One Core ML call over a stateful KV cache (see the module docstring).

    Args:
        ref: the reference model (float32 weights); its modules are reused.
        max_context: ``C``, cache slots.
        commit_slots: ``K``, slot copies applied at the start of a call.
        cache_dtype: dtype of the key/value state (float16 for Core ML).
        compute_dtype: dtype of the computation (the weights' dtype; float32
            for tracing, float16 to emulate the package's arithmetic).
    """

    def __init__(self, ref, max_context: int, commit_slots: int, cache_dtype=None,
                 compute_dtype=None) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype or torch.float32
        self.ref = ref.to(self.compute_dtype)
        attn = ref.base.model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.gamma, self.split = ref.gamma, ref.split
        self.commit_slots, self.max_context = commit_slots, max_context
        self.hidden_value = interface.mask_value("hidden")
        shape = (len(ref.base.model.layers), self.kv_heads, max_context, self.head_dim)
        dtype = cache_dtype or torch.float16
        self.register_buffer(interface.state_name("key_cache"), torch.zeros(shape, dtype=dtype))
        self.register_buffer(interface.state_name("value_cache"), torch.zeros(shape, dtype=dtype))
        rot = ref.rot_dim
        inv = 1.0 / ref.theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
        self.register_buffer("inv_freq", inv, persistent=False)

    @property
    def keys(self):
        return getattr(self, interface.state_name("key_cache"))

    @property
    def values(self):
        return getattr(self, interface.state_name("value_cache"))

    def reset(self) -> None:
        """Empty the cache (a new conversation)."""
        with torch.no_grad():
            self.keys.zero_()
            self.values.zero_()

    # --- pieces ------------------------------------------------------------------

    def _commit(self, src, dst) -> None:
        """In-order copies ``slot dst[k] <- slot src[k]`` in every layer's keys and values."""
        for k in range(self.commit_slots):
            s, d = src[k], dst[k]
            self.keys[:, :, d : d + 1] = self.keys[:, :, s : s + 1]
            self.values[:, :, d : d + 1] = self.values[:, :, s : s + 1]

    def _rope(self, positions):
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (R, rot/2)
        return angles.cos().to(self.compute_dtype), angles.sin().to(self.compute_dtype)

    def _msa_mask(self, mask, rows: int):
        """Mask of a multi-stream layer: ``(T, C)`` -> ``(T + T*G, C + T*G)``.

        Stream ``(t, j)`` sees the slots row ``t`` sees and streams ``(t, 0..j)``;
        main rows never see stream rows (either mode).
        """
        g = self.gamma
        r = torch.arange(rows * g)  # stream rows, t = r // g, j = r % g
        owner, slot = torch.div(r, g, rounding_mode="floor"), torch.remainder(r, g)
        hidden = self.hidden_value
        same = (owner[:, None] == owner[None, :]) & (slot[None, :] <= slot[:, None])
        stream_block = (~same).to(mask.dtype) * hidden  # (T*G, T*G), additive
        to_cache = mask[:, None, :].expand(-1, g, -1).reshape(rows * g, -1)  # (T*G, C)
        main_streams = torch.full((rows, rows * g), hidden, dtype=mask.dtype)  # (T, T*G)
        top = torch.cat([mask, main_streams], 1)
        return torch.cat([top, torch.cat([to_cache, stream_block], 1)], 0)

    def _attention(self, index: int, x, rope, mask, rows: int, start, streams: bool):
        """Layer ``index``'s attention for ``x`` ``(R, H)``; rows ``:rows`` are main rows.

        Main rows' keys/values are written to the state at ``start``; stream rows'
        (``rows:``) are appended after the ``C`` cache slots and never stored.
        """
        attn = self.ref.base.model.layers[index].self_attn
        length = x.shape[0]
        if attn.fused:
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = attn.qkv_proj(x).split([q_size, kv_size, kv_size], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(length, self.heads, self.head_dim).transpose(0, 1)  # (heads, R, D)
        k = k.view(length, self.kv_heads, self.head_dim).transpose(0, 1)  # (KV, R, D)
        v = v.view(length, self.kv_heads, self.head_dim).transpose(0, 1)
        if hasattr(attn, "q_norm"):
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        cos, sin = rope
        q, k = _rotate(q, cos, sin, attn.rot_dim), _rotate(k, cos, sin, attn.rot_dim)
        cache_dtype = self.keys.dtype
        self.keys[index, :, start : start + rows] = k[:, :rows].to(cache_dtype)
        self.values[index, :, start : start + rows] = v[:, :rows].to(cache_dtype)
        keys = self.keys[index].to(x.dtype)  # (KV, C, D)
        values = self.values[index].to(x.dtype)
        if streams:  # stream rows (a multi-stream layer): their keys/values follow the cache slots
            keys = torch.cat([keys, k[:, rows:]], 1)
            values = torch.cat([values, v[:, rows:]], 1)
        groups = self.heads // self.kv_heads
        q = q.reshape(self.kv_heads, groups, length, self.head_dim)  # head h = kv * groups + g
        scores = (q @ keys[:, None].transpose(2, 3)) * attn.scale + mask  # (KV, g, R, S)
        out = torch.softmax(scores, -1).to(values.dtype) @ values[:, None]  # (KV, g, R, D)
        return attn.o_proj(out.reshape(self.heads, length, self.head_dim).transpose(0, 1).reshape(length, -1))

    def _layer(self, index: int, h, rope, mask, rows: int, start):
        layer = self.ref.base.model.layers[index]
        if layer.gemma3:
            raise NotImplementedError("Gemma 3 layers are not exported")
        streams = index >= self.split
        h = h + self._attention(index, rms_norm(layer.input_layernorm, h), rope, mask, rows, start, streams)
        return h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))

    def _head(self, h):
        """Logits of final-norm hidden states ``(R, H) -> (R, V)`` (one weight for tied heads)."""
        base = self.ref.base
        weight = base.model.embed_tokens.weight if base.tied else base.lm_head.weight
        out = F.linear(h, weight)
        cap = self.ref.cfg.get("final_logit_softcapping")
        return torch.tanh(out / cap) * cap if cap else out

    # --- the call ----------------------------------------------------------------

    def forward(self, input_ids, position_ids, attention_mask, write_start, commit_src, commit_dst):
        """One call (``interface.json``).

        Args:
            input_ids, position_ids: ``(1, T)`` int32.
            attention_mask: ``(1, 1, T, C)`` additive (float16 in the package).
            write_start: ``(1,)`` int32; commit_src, commit_dst: ``(K,)`` int32.

        Returns:
            ``(main_logits (1, T, V), stream_logits (1, T, G, V))``.
        """
        self._commit(commit_src, commit_dst)
        ref, g = self.ref, self.gamma
        rows = input_ids.shape[1]
        start = write_start[0]
        positions = position_ids[0]  # (T,)
        mask = attention_mask[0, 0].to(self.compute_dtype)  # (T, C)
        h = ref.embed(input_ids[0])  # (T, H)
        rope = self._rope(positions)
        for i in range(self.split):
            h = self._layer(i, h, rope, mask, rows, start)
        streams = h[:, None, :] + ref.stream_embeddings.to(h.dtype)  # (T, G, H)
        h = torch.cat([h, streams.reshape(rows * g, -1)], 0)  # (T + T*G, H)
        offsets = torch.arange(1, g + 1, dtype=positions.dtype)
        stream_pos = (positions[:, None] + offsets[None, :]).reshape(-1)
        rope = self._rope(torch.cat([positions, stream_pos]))
        mask = self._msa_mask(mask, rows)
        for i in range(self.split, len(ref.base.model.layers)):
            if len(ref.stream_adapters):
                adapter = ref.stream_adapters[i - self.split]
                h = torch.cat([h[:rows], adapter(h[rows:])], 0)
            h = self._layer(i, h, rope, mask, rows, start)
        h = rms_norm(ref.base.model.norm, h)
        main = self._head(h[:rows])  # (T, V)
        stream = self._head(h[rows:]).reshape(rows, g, -1)  # (T, G, V)
        return main[None], stream[None]
