"""Cached training: what the frozen part of the model computes, computed once.

Both modes freeze the layers below the multi-stream layers (shared mode's LoRA
sits on the top ``Ns`` layers only), so an example's hidden state at the input
of layer ``N - Ns`` never changes. Shared mode caches just that
(``LowerCache``, filled as examples are first used): later steps run only the
top layers on it. Lossless mode caches more, below.

**Lossless mode: the main stream computed once.**

In lossless mode nothing trainable touches the main rows: the base is frozen,
main rows never attend to stream rows, and the stream adapters act on stream
rows only. So the main stream of every training example -- its hidden state at
the input of layer ``N - Ns`` and its keys/values in each multi-stream layer --
is the same at every step. ``precompute`` runs it once; each training step then
runs only the stream rows of the positions that carry loss, as queries over
those cached keys/values (plus their own earlier streams), exactly the
computation the stream rows get at inference and in ``losses.train_forward``.
Training keeps these results on disk beside the checkpoint (``<out>.main-cache``,
shards keyed by each example), so ``--resume`` and runs on longer prefixes of
the same corpus compute only what is new.

The vocabulary projection of the stream rows is restricted to a candidate set
(every token that occurs as a training target, plus fresh random tokens each
step as extra negatives): the targets are a few thousand distinct tokens, so
this is several times cheaper than the full vocabulary. The early-exit
(pruning) loss is computed the same way on the main rows' cached hidden states.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import Example
from ..families import embed, lm_head_weight
from ..forward import adapt_streams
from .losses import LossWeights, TrainView, causal_layers, lower_forward
from ..masks import within_window
from ..model import SpecStreamModel
from ..rope import RowPositions


@dataclass
class MainStream:
    """Cached main stream of one example.

    Attributes:
        tokens: ``(T,)`` token ids (numpy).
        loss_start: first target index.
        hidden: ``(T - hidden_start, H)`` hidden state at the input of layer
            ``N - Ns``, rows ``hidden_start ..`` only: no earlier row's streams
            carry loss (``main_rows_from``).
        keys, values: per multi-stream layer, ``(1, H_kv, T, D)`` (keys after RoPE).
        hidden_start: the first row kept in ``hidden``.

    The arrays may be stored in a narrower type than the model's
    (``precompute``'s ``dtype``); ``stream_hidden`` computes in the model's.
    """

    tokens: np.ndarray
    loss_start: int
    hidden: mx.array
    keys: List[mx.array]
    values: List[mx.array]
    hidden_start: int = 0
    dtype: Optional[mx.Dtype] = None  # the model's activations' (None: the stored one)

    def rows(self, at: np.ndarray) -> mx.array:
        """Hidden states of rows ``at`` (absolute positions), in the model's type: ``(len(at), H)``."""
        rows = self.hidden[mx.array(at - self.hidden_start)]
        return rows if self.dtype is None else rows.astype(self.dtype)


def main_rows_from(loss_start: int, gamma: int) -> int:
    """The first row whose streams carry loss: stream ``gamma`` of row ``t`` predicts ``t + 1 + gamma``."""
    return max(0, loss_start - 1 - gamma)


CACHE_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def main_stream_bytes(model: SpecStreamModel, examples: Sequence[Example], dtype=None) -> int:
    """Bytes ``precompute`` keeps for ``examples``: keys/values of every row, hidden from the first loss row."""
    args = model.base.args
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    kv = 2 * (model.num_layers - model.first_stream_layer) * heads * head_dim
    gamma, size = model.config.gamma, (dtype or _activation_dtype(model)).size
    return size * sum(len(e.tokens) * kv + (len(e.tokens) - main_rows_from(e.loss_start, gamma))
                      * model.config.hidden_size for e in examples)


def _activation_dtype(model: SpecStreamModel):
    """The type of the main stream's hidden states (the embedding's output)."""
    return embed(model.family, model.base, mx.array([[0]])).dtype


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        return None


def _report(label: str, done: int, total: int, tic: float) -> None:
    if done % 20 == 0 or done == total:
        rate = done / (time.perf_counter() - tic)
        print(f"\r[{label}] {done}/{total} examples ({rate:.1f}/s)", file=sys.stderr, end="",
              flush=True)
        if done == total:
            print(file=sys.stderr)


class LowerCache:
    """Each example's hidden state at the input of layer ``N - Ns``, computed on first use.

    What ``losses.train_forward`` computes below the multi-stream layers
    (``losses.lower_forward``). A batch computes the states of its examples
    not seen before (together, padded at the end: attention is causal, so
    padding changes no real row) and keeps them, so the first epoch costs
    what uncached training costs and every later step skips the lower layers.

    With ``folder``, ``flush`` writes the states computed since the last flush
    to a new shard there (atomically), and a later cache over the same base
    model reads them back, so a resumed run (next session) does not pay the
    first epoch again. Shards live under a fingerprint of the frozen weights
    and are keyed by each example's tokens; states of other models or other
    examples are never used.
    """

    def __init__(self, model: SpecStreamModel, examples: Sequence[Example],
                 folder: Optional[Path] = None):
        self.model, self.examples = model, examples
        self.states: List[Optional[mx.array]] = [None] * len(examples)  # (T_i, H) each
        self.fresh: List[int] = []  # computed since the last flush
        self.folder = None if folder is None else Path(folder) / _fingerprint(model)
        if self.folder is not None and self.folder.is_dir():
            self._read()

    def _key(self, i: int) -> str:
        return hashlib.sha1(np.asarray(self.examples[i].tokens, np.int64).tobytes()).hexdigest()

    def _read(self) -> None:
        wanted = {}
        for i in range(len(self.examples)):
            wanted.setdefault(self._key(i), []).append(i)
        for key, state in _read_shards(self.folder, "lower"):
            for i in wanted.get(key, ()):
                self.states[i] = state

    def flush(self) -> None:
        """Write the states computed since the last flush as one new shard (no-op without a folder)."""
        if self.folder is None or not self.fresh:
            return
        _write_shard(self.folder, "lower", {self._key(i): self.states[i] for i in self.fresh})
        self.fresh = []

    def batch(self, indices: Sequence[int], length: int) -> mx.array:
        """The chosen examples' states, padded with zeros to ``length``: ``(B, length, H)``."""
        missing = [i for i in dict.fromkeys(int(i) for i in indices) if self.states[i] is None]
        if missing:
            longest = max(len(self.examples[i].tokens) for i in missing)
            tokens = np.zeros((len(missing), longest), dtype=np.int32)
            for row, i in enumerate(missing):
                tokens[row, : len(self.examples[i].tokens)] = self.examples[i].tokens
            hidden = lower_forward(self.model, mx.array(tokens))  # (B', T, H)
            for row, i in enumerate(missing):
                self.states[i] = hidden[row, : len(self.examples[i].tokens)]
            mx.eval([self.states[i] for i in missing])
            self.fresh.extend(missing)
        rows = []
        for i in indices:
            h = self.states[int(i)][:length]
            if h.shape[0] < length:
                h = mx.concatenate([h, mx.zeros((length - h.shape[0], h.shape[1]), h.dtype)])
            rows.append(h)
        return mx.stack(rows)


def _fingerprint(model: SpecStreamModel, layers: Optional[int] = None) -> str:
    """A name for the frozen embedding and first ``layers`` layers (default: those below the
    multi-stream layers)."""
    from mlx.utils import tree_flatten

    layers = model.first_stream_layer if layers is None else layers
    digest = hashlib.sha1(f"{layers}:{model.config.hidden_size}".encode())
    parts = [model.base.model.embed_tokens] + [model.layers[i] for i in range(layers)]
    for part in parts:
        for name, value in tree_flatten(part.parameters()):
            flat = value.reshape(-1).astype(mx.float32)
            # A stream-LoRA wrapper (``StreamRowsLinear``) names its base weight
            # ``<proj>.inner.weight``; the main rows compute with that weight alone,
            # so the name without ``.inner`` keeps one cache for runs with and without it.
            digest.update(name.replace(".inner.", ".").encode())
            digest.update(np.array([flat.sum().item(), (flat * flat).sum().item(),
                                    flat[: 64].sum().item()], dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def precompute(model: SpecStreamModel, examples: Sequence[Example], dtype=None,
               folder: Optional[Path] = None, flush_every: int = 256) -> List[MainStream]:
    """Run the frozen main stream of every example once (with progress).

    Args:
        dtype: keep the states in this type (``None``: the model's). float16
            halves the memory of a float32 model's cache; the states are then
            rounded once, the streams' training computes in the model's type.
        folder: keep the results on disk too, as shards of ``flush_every``
            examples under a fingerprint of the frozen model and the type,
            each keyed by the example's tokens, ``loss_start`` and gamma. A
            later call (a resumed run, or a run on a longer prefix of the same
            corpus) reads them back and computes only the examples it lacks.

    Raises:
        ValueError: the cache would not fit in this machine's memory (the
            message says what to pass instead).
    """
    split, n = model.first_stream_layer, model.num_layers
    if dtype is not None and dtype == mx.float16 and _activation_dtype(model) == mx.bfloat16:
        raise ValueError("this is a bfloat16 model: its states may not fit in float16's range; "
                         "pass --cache-dtype bfloat16")
    need, have = main_stream_bytes(model, examples, dtype), _memory_bytes()
    if have is not None and need > 0.75 * have:
        raise ValueError(
            f"the cached main stream of {len(examples)} examples needs {need / 2**30:.1f} GiB, more "
            f"than 3/4 of this machine's {have / 2**30:.1f} GiB: pass --cache-dtype float16 (half "
            f"the size for a float32 model), fewer --data-tokens or a lower --max-seq-len")
    gamma, kind = model.config.gamma, _activation_dtype(model)
    shards = None
    if folder is not None:
        stored_as = kind if dtype is None else dtype
        # The states depend on the frozen weights, on where the multi-stream
        # layers start (the hidden state kept is layer ``split``'s input) and the type.
        shards = Path(folder) / f"{_fingerprint(model, n)}-from{split}-{str(stored_as).split('.')[-1]}"
    keys_of = [_main_key(e, gamma) for e in examples]
    found = _read_main(shards, set(keys_of)) if shards is not None else {}
    # A copy of each slice: a slice alone keeps its whole parent buffer alive.
    # ``mx.contiguous`` is not enough (a slice of whole rows is contiguous
    # already); ``mx.array`` copies.
    store = (lambda a: mx.array(a if dtype is None else a.astype(dtype)))
    out, fresh = [], {}
    tic = time.perf_counter()
    for i, example in enumerate(examples, start=1):
        tokens = np.array(example.tokens, dtype=np.int32)
        first = main_rows_from(example.loss_start, gamma)
        arrays = found.get(keys_of[i - 1])
        if arrays is None:
            views = [TrainView(0) for _ in range(split, n)]
            hidden = lower_forward(model, mx.array(tokens)[None])  # (1, T, H)
            causal_layers(model, hidden, range(split, n), views)  # the multi-stream layers' keys/values
            arrays = ([store(hidden[0, first:])] + [store(v.keys) for v in views]
                      + [store(v.values) for v in views])
            mx.eval(arrays)
            if shards is not None:
                fresh[keys_of[i - 1]] = arrays
                if len(fresh) >= flush_every:
                    _write_main(shards, fresh)
                    fresh = {}
        layers = n - split
        out.append(MainStream(tokens, example.loss_start, arrays[0], arrays[1: 1 + layers],
                              arrays[1 + layers:], first, None if dtype is None else kind))
        _report("cache main stream", i, len(examples), tic)
    if shards is not None and fresh:
        _write_main(shards, fresh)
    return out


def _main_key(example: Example, gamma: int) -> str:
    head = np.array([example.loss_start, gamma], np.int64).tobytes()
    return hashlib.sha1(head + np.asarray(example.tokens, np.int64).tobytes()).hexdigest()


def _read_shards(folder: Path, prefix: str):
    """Every ``(name, array)`` of the ``{prefix}-NNNNN.safetensors`` shards in ``folder``."""
    for shard in sorted(folder.glob(f"{prefix}-*.safetensors")) if folder.is_dir() else ():
        yield from mx.load(str(shard)).items()


def _write_shard(folder: Path, prefix: str, arrays: dict) -> None:
    """``arrays`` as the next ``{prefix}-NNNNN.safetensors`` shard, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{len(list(folder.glob(f'{prefix}-*.safetensors'))):05d}.safetensors"
    tmp = folder / f".{name}.{os.getpid()}.tmp.safetensors"  # hidden from the glob
    try:
        mx.save_safetensors(str(tmp), arrays)
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)


def _read_main(folder: Path, wanted: set) -> dict:
    """``precompute``'s arrays per example key (``{key}.{index}``: hidden, keys, values)."""
    found: dict = {}
    for name, array in _read_shards(folder, "main"):
        key, index = name.rsplit(".", 1)
        if key in wanted:
            found.setdefault(key, {})[int(index)] = array
    return {key: [parts[j] for j in range(len(parts))] for key, parts in found.items()}


def _write_main(folder: Path, arrays: dict) -> None:
    _write_shard(folder, "main", {f"{key}.{j}": a for key, parts in arrays.items()
                                  for j, a in enumerate(parts)})


class _FixedKV:
    """Cache stand-in: cached main keys/values followed by the stream rows' own."""

    def __init__(self, keys: mx.array, values: mx.array, offset: RowPositions) -> None:
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys, values):
        return (mx.concatenate([self.keys.astype(keys.dtype), keys], axis=2),
                mx.concatenate([self.values.astype(values.dtype), values], axis=2))


def _stream_plan(main: MainStream, gamma: int, sample: Optional[np.ndarray] = None):
    """Positions whose streams carry loss, and the stream rows' mask and positions.

    ``sample``: uniform numbers in [0, 1) choosing a random subset of those
    positions (one per position kept), or ``None`` for all of them.
    """
    length = len(main.tokens)
    first = main_rows_from(main.loss_start, gamma)
    positions = np.arange(first, length - 1)  # (R,) rows t; stream j predicts t + 1 + j
    if sample is not None and sample.size < positions.size:
        positions = np.unique(positions[(sample * positions.size).astype(np.int64)])  # sorted
    rows = positions.size
    stream_pos = (positions[:, None] + np.arange(1, gamma + 1)[None, :]).reshape(-1)  # (R*g,)
    owner = np.repeat(positions, gamma)  # position t of each stream row
    see_main = np.arange(length)[None, :] <= owner[:, None]  # (R*g, T)
    same = np.repeat(np.arange(rows), gamma)
    order = np.tile(np.arange(gamma), rows)
    see_streams = (same[:, None] == same[None, :]) & (order[None, :] <= order[:, None])
    block = np.concatenate([see_main, see_streams], axis=1)  # (R*g, T + R*g)
    key_pos = np.concatenate([np.arange(length), stream_pos])
    return positions, stream_pos, block, key_pos


def stream_hidden(model: SpecStreamModel, main: MainStream,
                  sample: Optional[np.ndarray] = None) -> tuple:
    """Final-norm stream hidden states for one cached example.

    ``sample`` picks a random subset of positions (see ``_stream_plan``).

    Returns:
        ``(positions, hidden)``: rows ``t`` (numpy ``(R,)``) and ``(R, gamma, H)``.
    """
    gamma, split = model.config.gamma, model.first_stream_layer
    positions, stream_pos, block, key_pos = _stream_plan(main, gamma, sample)
    h = main.rows(positions)
    h = h[:, None, :] + model.stream_embeddings.astype(h.dtype)
    h = h.reshape(1, positions.size * gamma, -1)  # (1, R*g, H)
    offset = RowPositions(mx.array(stream_pos.astype(np.int32)))
    masks = {}
    with model.stream_rows(0):  # every row here is a stream row
        for i, layer in enumerate(range(split, model.num_layers)):
            window = model.windows[layer]
            if window not in masks:
                masks[window] = mx.array(within_window(block, stream_pos, key_pos, window))
            h = adapt_streams(model, h, layer, 0)
            cache = _FixedKV(main.keys[i], main.values[i], offset)
            h = model.layers[layer](h, masks[window], cache=cache)
    h = model.base.model.norm(h[0])
    return positions, h.reshape(positions.size, gamma, -1)


def _head_weight(model: SpecStreamModel) -> mx.array:
    return lm_head_weight(model.base, "cached training")  # (V, H)


def _subset_ce(hidden: mx.array, targets: np.ndarray, weight: mx.array, candidates: np.ndarray):
    """Cross-entropy over ``candidates`` only; targets must be among them."""
    index = np.searchsorted(candidates, targets)
    logits = (hidden @ weight[mx.array(candidates)].T).astype(mx.float32)  # (n, C)
    wanted = mx.array(index.astype(np.int32))
    loss = nn.losses.cross_entropy(logits, wanted).sum()
    hits = (mx.argmax(logits, axis=-1) == wanted).sum()
    return loss, hits


class CachedLoss:
    """Loss over cached main streams, for ``train.loop.train``.

    Args:
        model: the model (lossless mode).
        mains: from ``precompute``.
        weights: loss weights (``main`` is ignored: the main stream is frozen).
        negatives: random extra candidate tokens per step.
        seed: for the negatives and the position samples.
        positions: train the streams of this many random positions per example
            and step (``None``: all). Neighbouring positions are much alike, so
            a sample over more examples teaches more per step for the same cost.
    """

    def __init__(self, model: SpecStreamModel, mains: List[MainStream], weights: LossWeights,
                 negatives: int = 4096, seed: int = 0, positions: Optional[int] = None) -> None:
        if model.config.shared:
            raise ValueError("cached training is for lossless mode (the main stream is frozen)")
        self.mains, self.weights, self.negatives = mains, weights, negatives
        self.vocab = model.config.vocab_size
        self.targets = np.unique(np.concatenate([m.tokens[m.loss_start:] for m in mains]))
        self.seed = seed
        self.positions = positions

    def candidates(self, step: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed * 1_000_003 + step)
        extra = rng.integers(0, self.vocab, size=self.negatives)
        return np.union1d(self.targets, extra)

    def __call__(self, model: SpecStreamModel, indices: Sequence[int], step: int):
        gamma = model.config.gamma
        weight = _head_weight(model)
        candidates = self.candidates(step)
        sums = {f"stream_{j}": [mx.array(0.0), 0, mx.array(0)] for j in range(1, gamma + 1)}
        sums["exit"] = [mx.array(0.0), 0, mx.array(0)]
        rng = np.random.default_rng([self.seed, step, 1])
        for index in indices:
            main = self.mains[int(index)]
            sample = None if self.positions is None else rng.random(self.positions)
            positions, hidden = stream_hidden(model, main, sample)  # (R,), (R, g, H)
            length = len(main.tokens)
            for j in range(1, gamma + 1):
                target_at = positions + 1 + j
                use = (target_at < length) & (target_at >= main.loss_start)
                if not use.any():
                    continue
                rows = mx.array(np.flatnonzero(use).astype(np.int32))
                loss, hits = _subset_ce(hidden[rows, j - 1], main.tokens[target_at[use]],
                                        weight, candidates)
                entry = sums[f"stream_{j}"]
                entry[0], entry[1], entry[2] = entry[0] + loss, entry[1] + int(use.sum()), entry[2] + hits
            if self.weights.early_exit > 0:
                at = np.arange(max(main.loss_start - 1, 0), length - 1)
                exits = model.base.model.norm(model.prune_adapter(main.rows(at)))
                loss, hits = _subset_ce(exits, main.tokens[at + 1], weight, candidates)
                entry = sums["exit"]
                entry[0], entry[1], entry[2] = entry[0] + loss, entry[1] + at.size, entry[2] + hits
        total, metrics = mx.array(0.0), {}
        for name, (loss, count, hits) in sums.items():
            if count == 0:
                continue
            mean = loss / count
            metrics[f"{name}_loss"] = mean
            metrics[f"{name}_acc"] = hits / count
            total = total + (self.weights.early_exit if name == "exit" else self.weights.stream) * mean
        return total, metrics
