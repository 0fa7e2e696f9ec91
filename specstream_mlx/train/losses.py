"""Training forward and loss of a Speculative Streaming model (docs/design.md, "Streams").

Every position ``t`` of a training sequence gets its ``gamma`` stream rows in
the top ``Ns`` layers, under the same MSA mask as at inference (built by
``masks.msa_block`` over a chain), with the same RoPE positions ``t + j``.
The lower layers run without gradients: only the top layers, the stream
parameters and (in shared mode) the LoRA weights of the top layers learn.

Loss: ``L = a0 * CE(main) + sum_j a_j * CE(stream j -> token t+1+j)``
``+ a_exit * CE(early exit -> token t+1)``; the early-exit term reaches only
the pruning adapter (its input is gradient-free).

Medusa-2 (the paper's peer, trained jointly with LoRA in shared mode): with
Medusa heads being trained (``loop.make_trainable``), head ``k`` on the final hidden
state at ``t`` adds ``medusa * 0.8^(k-1) * CE(head k -> token t+1+k)``
(Medusa-2's weights: lambda_0 times a decay per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..families import embed, lm_head
from ..forward import adapt_streams
from ..masks import chain_rows, msa_block, row_positions, within_window
from ..model import SpecStreamModel
from ..rope import RowPositions


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (paper: a0 = 1, a_j = 0.1; lossless: a0 = 0)."""

    main: float = 0.0
    stream: float = 0.1
    early_exit: float = 0.1
    medusa: float = 0.2  # Medusa-2's lambda_0; head k gets medusa * MEDUSA_DECAY ** (k - 1)


#: Medusa-2's per-head decay of the heads' loss weight.
MEDUSA_DECAY = 0.8


class TrainView:
    """Cache stand-in for training: hands RoPE the row positions and holds the layer's
    last keys (after RoPE) and values, ``(B, H_kv, T, D)``, for whoever wants them."""

    def __init__(self, offset):
        self.offset = offset
        self.keys = self.values = None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


def causal_layers(model: SpecStreamModel, h: mx.array, layer_ids, views=None) -> mx.array:
    """Main rows only: ``layer_ids`` on whole sequences ``(B, T, H)`` from position 0, causal.

    ``views``: one ``TrainView`` per layer (to keep its keys/values), or ``None``.
    """
    rows = chain_rows(h.shape[1])
    masks = {}
    for n, i in enumerate(layer_ids):
        window = model.windows[i]
        if window not in masks:
            masks[window] = "causal" if window is None else mx.array(
                within_window(rows.ancestors, rows.depth, rows.depth, window))
        h = model.layers[i](h, masks[window], cache=TrainView(0) if views is None else views[n])
    return h


def lower_forward(model: SpecStreamModel, tokens: mx.array) -> mx.array:
    """The frozen layers below the multi-stream layers: ``(B, T)`` -> ``(B, T, H)``, no gradient.

    Neither mode trains them (shared mode's LoRA is on the top ``Ns`` layers
    only), so their output for an example never changes: cached training
    computes it once (``cached.LowerCache``).
    """
    h = embed(model.family, model.base, tokens)  # (B, T, H)
    return mx.stop_gradient(causal_layers(model, h, range(model.first_stream_layer)))


def train_forward(model: SpecStreamModel, tokens: mx.array, lower: Optional[mx.array] = None,
                  with_streams: bool = True, stream_from: int = 0):
    """Hidden states for a batch of full sequences.

    Args:
        model: the model.
        tokens: ``(B, T)`` token ids.
        lower: ``lower_forward(model, tokens)`` when already computed (cached training).
        with_streams: run the stream rows (off for a plain LoRA fine-tune).
        stream_from: first position that gets stream rows (earlier ones would
            only guess prompt tokens, which carry no loss). Exact for the rest:
            a stream row sees main rows and its own node's streams only.

    Returns:
        ``(main, streams, early_exit)``: final-norm hidden states ``(B, T, H)``,
        ``(B, T - stream_from, gamma, H)`` (``None`` without streams) and the
        early-exit head's normed input ``(B, T, H)``.
    """
    config = model.config
    gamma, split = config.gamma, model.first_stream_layer
    batch, length = tokens.shape
    h = lower_forward(model, tokens) if lower is None else mx.stop_gradient(lower)

    early_exit = model.base.model.norm(model.prune_adapter(h))
    if not with_streams:
        rows = chain_rows(length)
        block, all_positions = rows.ancestors, rows.depth
    else:
        rows = chain_rows(length, np.arange(stream_from, length))
        count = length - stream_from
        streams = h[:, stream_from:, None, :] + model.stream_embeddings.astype(h.dtype)  # (B, T', gamma, H)
        h = mx.concatenate([h, streams.reshape(batch, count * gamma, -1)], axis=1)
        block = msa_block(rows, gamma)
        all_positions = row_positions(rows, gamma, with_streams=True)
    offset = RowPositions(mx.array(all_positions.astype(np.int32)))
    masks = {}
    with model.stream_rows(length if with_streams else None):
        for i in range(split, model.num_layers):
            window = model.windows[i]
            if window not in masks:
                masks[window] = mx.array(within_window(block, all_positions, all_positions, window))
            if with_streams:
                h = adapt_streams(model, h, i, length)
            h = model.layers[i](h, masks[window], cache=TrainView(offset))
    h = model.base.model.norm(h)
    if not with_streams:
        return h, None, early_exit
    return h[:, :length], h[:, length:].reshape(batch, count, gamma, -1), early_exit


def _ce(model, hidden: mx.array, targets: mx.array, mask: np.ndarray):
    """Summed cross-entropy, count and hits over the masked positions.

    Only the masked rows go through the LM head (the vocabulary projection is
    the largest cost per row; prompt positions carry no loss).

    Args:
        hidden: ``(B, T', H)`` final-norm hidden states.
        targets: ``(B, T')`` target token ids.
        mask: ``(B, T')`` bool numpy array.
    """
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        zero = mx.array(0.0)
        return zero, zero, zero
    index = mx.array(rows.astype(np.int32))
    picked = hidden.reshape(-1, hidden.shape[-1])[index]  # (n, H)
    wanted = targets.reshape(-1)[index]  # (n,)
    logits = lm_head(model.base, picked).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, wanted)
    hits = mx.argmax(logits, axis=-1) == wanted
    return losses.sum(), mx.array(float(rows.size)), hits.sum()


def loss_fn(model: SpecStreamModel, tokens: mx.array, loss_mask: mx.array, weights: LossWeights,
            lower: Optional[mx.array] = None):
    """Weighted training loss and per-term figures.

    Args:
        model: the model.
        tokens: ``(B, T)`` token ids.
        loss_mask: ``(B, T)`` bool (numpy or mx), True on tokens that are targets.
        weights: loss weights; with ``stream == 0`` no stream rows run (a
            plain LoRA fine-tune of the same layers, the baseline).
        lower: the frozen lower layers' output for ``tokens``, if cached.

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of arrays: ``stream_j_loss``
        and ``stream_j_acc`` (top-1 accuracy of stream ``j``), ``main_loss``,
        ``exit_loss``.
    """
    mask = np.asarray(loss_mask, dtype=bool)
    length = tokens.shape[1]
    gamma = model.config.gamma
    # Stream j at row t predicts token t + 1 + j: rows before the first target - 1 - gamma
    # guess prompt tokens only, so they get no stream rows.
    first = int(np.argmax(mask.any(axis=0))) if mask.any() else length
    start = max(0, min(first - 1 - gamma, length - 1))
    main, streams, early_exit = train_forward(model, tokens, lower, with_streams=weights.stream > 0,
                                              stream_from=start)
    total = mx.array(0.0)
    metrics = {}
    # Main row t and the early exit at t predict token t + 1.
    if weights.main > 0:
        s, n, _ = _ce(model, main[:, :-1], tokens[:, 1:], mask[:, 1:])
        metrics["main_loss"] = s / mx.maximum(n, 1)
        total = total + weights.main * metrics["main_loss"]
    if weights.early_exit > 0:
        s, n, _ = _ce(model, early_exit[:, :-1], tokens[:, 1:], mask[:, 1:])
        metrics["exit_loss"] = s / mx.maximum(n, 1)
        total = total + weights.early_exit * metrics["exit_loss"]
    # Stream j at row t predicts token t + 1 + j.
    for j in range(1, gamma + 1 if streams is not None else 1):
        if length <= start + j + 1:
            break
        s, n, hits = _ce(model, streams[:, : length - 1 - j - start, j - 1],
                         tokens[:, start + 1 + j :], mask[:, start + 1 + j :])
        metrics[f"stream_{j}_loss"] = s / mx.maximum(n, 1)
        metrics[f"stream_{j}_acc"] = hits / mx.maximum(n, 1)
        total = total + weights.stream * metrics[f"stream_{j}_loss"]
    # Medusa-2: head k on main row t predicts token t + 1 + k (heads being trained only).
    heads = model.get("medusa_training") if weights.medusa > 0 else None
    for k, block in enumerate(heads.blocks if heads is not None else [], start=1):
        if length <= k + 1:
            break
        s, n, hits = _ce(model, block(main[:, : length - 1 - k]), tokens[:, 1 + k :], mask[:, 1 + k :])
        metrics[f"medusa_{k}_loss"] = s / mx.maximum(n, 1)
        metrics[f"medusa_{k}_acc"] = hits / mx.maximum(n, 1)
        total = total + weights.medusa * MEDUSA_DECAY ** (k - 1) * metrics[f"medusa_{k}_loss"]
    return total, metrics


def main_loss(model: SpecStreamModel, examples, max_seq_len: int = 384, batch_size: int = 4) -> dict:
    """Teacher-forced main-row cross-entropy on the examples' completion tokens.

    The dev loss of a learning curve: no stream rows run (main rows never see
    them), batches of ``batch_size``, sequences cut at ``max_seq_len``.

    Returns:
        ``{"main_loss": nats per target token, "tokens": target tokens}``.
    """
    from .data import collate

    weights = LossWeights(main=1.0, stream=0.0, early_exit=0.0)
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        indices = list(range(start, min(start + batch_size, len(examples))))
        tokens, mask = collate(examples, indices, max_seq_len)
        _, metrics = loss_fn(model, mx.array(tokens), mask, weights)
        targets = float(mask[:, 1:].sum())
        total += metrics["main_loss"].item() * targets
        count += targets
    if count == 0:
        raise ValueError("no completion tokens to score: give examples with completions")
    return {"main_loss": total / count, "tokens": int(count)}
