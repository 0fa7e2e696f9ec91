"""Greedy chain decoding with the host's work hidden behind the device's.

mlx-lm keeps the device busy while it decodes: it builds the graph of step
``k + 1`` on the host while step ``k`` computes (``mx.async_eval``). ``decode``
cannot, because the shape of the next forward depends on how many drafts step
``k`` accepted: the committed cache length sets every key range, mask and RoPE
position. On the CPU, building a 30-layer graph takes about 6 ms, 7% of a chain
step, with the device idle.

For a *chain* draft (one token per depth) under greedy decoding this module
removes that dependency, so each step is queued before the previous one is
read (the loop is ``decode._decode_overlapped``):

* **Slots, not a prefix.** Each forward writes its ``m`` main rows' keys and
  values into the next ``m`` free slots of every layer's buffer, an offset the
  host knows in advance. Rejected rows stay behind as holes. A device-side
  ``valid`` vector (one bool per slot) masks them out of every later query, so
  attention sees exactly the committed tokens, in position order, as in
  ``decode``. Stream rows are never stored: their keys are appended to the
  returned key range for the forward that computes them only.
* **Positions on the device.** ``P``, the number of committed tokens, is a
  device scalar; RoPE positions are ``P + depth`` (streams: ``P + i + j``).
  A key's rotation is applied when it is written and never changes, so holes
  do not shift anything.
* **Acceptance on the device.** Main row ``i`` (root ``i = 0``) predicts the
  token after draft ``i``; with ``a = argmax`` of the main rows, the accepted
  drafts are the longest prefix with ``draft[i] == a[i]``:
  ``n = sum(cumprod(draft == a[:-1]))``. The emitted tokens are ``a[:n + 1]``
  (the accepted drafts equal ``a[:n]``, and ``a[n]`` is the new root), the
  next drafts are the top-1 tokens of node ``n``'s streams, and node ``n`` is
  the last committed row: ``valid += (arange(m) <= n)``, ``P += n + 1``.

Exactness: each query sees the same keys (the committed prefix and its
ancestors in this forward, holes masked) at the same positions as in
``decode``, and the emitted tokens are the main rows' argmax along the
accepted path: ``decode``'s greedy rule, token for token. Masked keys add
exact zeros to the softmax; only the float summation order of the matmuls may
differ, as between any two row counts.

When holes pile up (long generations), the loop drains (waits for the queued
step) and compacts the buffers to the valid slots, so attention never spans
more than ``max_holes`` dead keys.

**Off by default; ``SPECSTREAM_OVERLAP=1`` turns it on.** Measured on the
2-core AMD EPYC with ``scripts/overlap_timing.py smollm2-135m-e2e-nlg
DEV.jsonl`` (chain 1,1,1, 3 dev prompts, 3 alternated rounds, same tokens):
85.5-92.0 ms per step with the overlap against 81.0-86.3 without (an earlier
run of the first version: 104-111 against 96-105). The host thread that builds the next graph competes with OpenBLAS's
two threads for the two cores, so the hidden host time costs more compute
time than it saves. The overlap pays where the device is not the CPU the
host runs on (an Apple GPU, as mlx-lm's ``async_eval`` assumes); no such
machine was available to measure it.
"""

from __future__ import annotations

import os
from typing import List, Optional

import mlx.core as mx
import numpy as np

from .cache import cache_state
from .families import embed
from .forward import adapt_streams, logits
from .masks import chain_rows, msa_block, row_positions
from .model import SpecStreamModel
from .rope import RowPositions

ENV = "SPECSTREAM_OVERLAP"
MAX_HOLES = 256  # dead slots tolerated before compacting


def wanted() -> bool:
    """``SPECSTREAM_OVERLAP=1`` is set (off by default: see the module doc).

    Raises:
        ValueError: a value other than ``0``, ``1`` or empty.
    """
    value = os.environ.get(ENV, "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: set it to 1 (overlapped greedy chains) or 0 (off)")
    return value == "1"


def eligible(model: SpecStreamModel, drafter, greedy: bool) -> bool:
    """Whether ``decode`` may run this generation's steps through ``ChainDecoder``.

    Greedy decoding with the streams' own drafter, a chain tree, no pruning,
    full attention in every layer, and one process (no sharding).
    """
    from .drafters import StreamDrafter

    if not (wanted() and greedy and type(drafter) is StreamDrafter):
        return False
    shape = drafter.shape
    chain = shape.size > 1 and np.array_equal(shape.parents[1:], np.arange(shape.size - 1))
    return (chain and drafter.prune is None and model.sharding is None
            and all(w is None for w in model.windows))


class _View:
    """What a layer sees as ``cache`` during one forward.

    ``update_and_fetch`` writes the first ``m`` rows (the main rows) as pending
    rows of the layer's ``cache.LayerCache`` (the next ``m`` slots) and returns
    every slot up to them, followed by this forward's stream rows (never stored).
    """

    def __init__(self, layer, offset, m: int) -> None:
        self.layer, self.offset, self.m = layer, offset, m

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        k, v = self.layer.write_pending(keys[..., : self.m, :], values[..., : self.m, :])
        if keys.shape[2] > self.m:
            k = mx.concatenate([k, keys[..., self.m :, :]], axis=2)
            v = mx.concatenate([v, values[..., self.m :, :]], axis=2)
        return k, v


class _Queued:
    """A step whose graph is built (and queued), read later."""

    def __init__(self, accepted: mx.array, argmax: mx.array, tokens: mx.array) -> None:
        self.accepted = accepted  # () int32: drafts accepted
        self.argmax = argmax  # (m,) main rows' argmax: the emitted tokens are [:accepted + 1]
        self.tokens = tokens  # (m,) the next step's root and drafts

    def read(self) -> List[int]:
        n = self.accepted.item()
        return self.argmax[: n + 1].tolist()


class ChainDecoder:
    """The state of one overlapped greedy chain generation (see the module doc).

    The slots are ``decode``'s own tree cache: each forward's main rows are
    written as its pending rows and all ``m`` of them are kept (``length`` counts
    slots, holes included), so ``cache.LayerCache`` grows and stores them.

    Args:
        model: the model.
        depth: drafts per step (the chain's length, ``<= gamma``).
        cache: ``decode``'s cache after the prefill (committed prompt).
        max_holes: dead slots tolerated before compacting (default ``MAX_HOLES``).
    """

    def __init__(self, model: SpecStreamModel, depth: int, cache,
                 max_holes: Optional[int] = None) -> None:
        self.model, self.depth, self.cache = model, depth, cache
        self.max_holes = MAX_HOLES if max_holes is None else max_holes
        self.m = depth + 1
        self.committed = self.used  # tokens committed, as far as the host has read
        self.position = mx.array(self.used, mx.int32)  # P on the device
        self.valid = mx.ones((self.used,), mx.bool_)
        rows = chain_rows(self.m, np.arange(self.m))
        self.lower_block = mx.array(rows.ancestors)  # (m, m)
        self.upper_block = mx.array(msa_block(rows, depth))  # (m + m*d, m + m*d)
        self.upper_depth = mx.array(row_positions(rows, depth, with_streams=True).astype(np.int32))
        self.streams = model.stream_embeddings[:depth]  # (d, H)

    @property
    def used(self) -> int:
        """Slots written (host-known): every layer's cache length."""
        return self.cache[0].length

    def _mask(self, block: mx.array) -> mx.array:
        rows = block.shape[0]
        seen = mx.broadcast_to(self.valid[None, :], (rows, self.used))
        return mx.concatenate([seen, block], axis=1)  # (rows, used + rows)

    def queue(self, tokens: mx.array) -> _Queued:
        """Build one step's graph on ``tokens`` ``(m,)`` (root, drafts) and queue it."""
        model, m, d = self.model, self.m, self.depth
        split = model.first_stream_layer
        h = embed(model.family, model.base, tokens[None])  # (1, m, H)
        mask = self._mask(self.lower_block)
        for i in range(split):  # consecutive rows: RoPE's own offset, on the device
            h = model.layers[i](h, mask, cache=_View(self.cache[i], self.position, m))
        stream_rows = h[:, :, None, :] + self.streams.astype(h.dtype)  # (1, m, d, H)
        h = mx.concatenate([h, stream_rows.reshape(1, m * d, -1)], axis=1)
        mask = self._mask(self.upper_block)
        offset = RowPositions(self.position + self.upper_depth)
        with model.stream_rows(m):
            for i in range(split, model.num_layers):
                h = adapt_streams(model, h, i, m)
                h = model.layers[i](h, mask, cache=_View(self.cache[i], offset, m))
        h = model.base.model.norm(h[0])  # (m + m*d, H)
        best = mx.argmax(logits(model, h), axis=-1).astype(mx.int32)  # (m + m*d,)
        argmax, guesses = best[:m], best[m:].reshape(m, d)
        hits = (tokens[1:] == argmax[:-1]).astype(mx.int32)
        accepted = mx.cumprod(hits).sum()  # () drafts accepted
        root = mx.take(argmax, accepted)
        self.valid = mx.concatenate([self.valid, mx.arange(m) <= accepted])
        self.position = self.position + accepted + 1  # the new root's position
        drafts = self.next_drafts(guesses, accepted)
        for layer in self.cache:  # every slot stays; the rejected ones are holes
            layer.commit(np.arange(m))
        step = _Queued(accepted, argmax, mx.concatenate([root[None], drafts]))
        mx.async_eval(step.accepted, step.argmax, step.tokens, self.valid, self.position,
                      cache_state(self.cache))
        return step

    def read(self, step: _Queued) -> List[int]:
        """The tokens ``step`` emitted (waits for it)."""
        tokens = step.read()
        self.committed += len(tokens)
        return tokens

    def next_drafts(self, guesses: mx.array, accepted: mx.array) -> mx.array:
        """The next step's drafts: the top-1 token of each stream of the last accepted
        node. ``(m, d), () -> (d,)``."""
        return mx.take(guesses, accepted, axis=0)

    def crowded(self) -> bool:
        """More dead slots than ``max_holes`` (counting the queued step's rows as used)."""
        return self.used - self.committed - self.m > self.max_holes

    def compact(self) -> None:
        """Keep only the valid slots (nothing may be queued)."""
        keep = mx.array(np.flatnonzero(np.array(self.valid)).astype(np.int32))
        for layer in self.cache:
            layer.keys, layer.values = layer.keys[..., keep, :], layer.values[..., keep, :]
            layer.length = int(keep.shape[0])
        self.valid = mx.ones((self.used,), mx.bool_)
