"""Runs across several processes (machines) with MLX's distributed engine.

``mlx.launch`` starts the ranks; each loads the base model through mlx-lm's
own ``sharded_load`` (``tensor``: every layer split across the ranks by the
family's ``shard()``; ``pipeline``: the layers split into stages by
``model.model.pipeline``), and the streams whole (they are small). Every rank
then runs the same decode loop on the same tokens: the layers' own collectives
(``all_sum`` in the sharded linears) give every rank the same hidden states,
hence the same drafts, the same verification and the same accepted path.

That "same" is checked, not assumed: ``RankCheck`` wraps the drafter and,
before each forward, gathers a fingerprint of every rank's history (all tokens
so far) and draft and stops with ``ShardError`` at the first step where two
ranks differ. Sampling draws the same numbers on every rank because every rank
is seeded with rank 0's seed (``agree_seed``). Only rank 0 prints, writes files
or serves (``is_main``).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .families import FAMILIES

SHARD_MODES = ("tensor", "pipeline")
LAUNCH_HINT = "mlx.launch -n 2 --backend ring -- $(which specstream-mlx)"


class ShardError(ValueError):
    """A sharded run cannot start, or its ranks disagree."""


def check_mode(shard: Optional[str]) -> Optional[str]:
    """``shard`` itself when it is ``None`` or one of ``SHARD_MODES``.

    Raises:
        ShardError: another value.
    """
    if shard is not None and shard not in SHARD_MODES:
        raise ShardError(f"shard must be one of {', '.join(SHARD_MODES)}, got {shard!r}")
    return shard


def group(shard: str) -> mx.distributed.Group:
    """The group of all ranks for a ``shard`` run.

    Raises:
        ShardError: the process was not started by ``mlx.launch`` (a group of one).
    """
    check_mode(shard)
    world = mx.distributed.init()
    if world.size() < 2:
        raise ShardError(f"--shard {shard} splits the model across processes, but this process runs "
                         f"alone: start it with `{LAUNCH_HINT} generate --shard {shard} ...` "
                         "(one rank per process or machine; a --hostfile for several machines)")
    return world


def capable_families(shard: str) -> list:
    """The ``model_type``s this runtime drives whose mlx-lm model can be split by ``shard``."""
    import importlib

    names = []
    for model_type, family in sorted(FAMILIES.items()):
        try:
            module = importlib.import_module(f"mlx_lm.models.{family.name}")
        except ImportError:
            continue
        model_class = getattr(module, "Model", None)
        inner = getattr(module, "LlamaModel", None) or getattr(module, f"{family.name.capitalize()}Model", None)
        if shard == "tensor" and hasattr(model_class, "shard"):
            names.append(model_type)
        elif shard == "pipeline" and inner is not None and hasattr(inner, "pipeline"):
            names.append(model_type)
    return names


def check_shardable(base, shard: str, world) -> None:
    """Stop unless mlx-lm can split ``base`` (a lazily loaded model) over ``world`` by ``shard``.

    Raises:
        ShardError: the family has no ``shard()`` / ``pipeline()`` (naming those that do), or
            its head counts or layer count do not divide among the ranks.
    """
    n = world.size()
    if shard == "tensor":
        if not hasattr(base, "shard"):
            raise ShardError(f"mlx-lm cannot split {base.model_type!r} models across ranks (--shard "
                             f"tensor works for {', '.join(capable_families('tensor')) or 'none'})")
        args = base.args
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(args, name, None)
            if value is not None and value % n:
                raise ShardError(f"--shard tensor over {n} ranks needs {name} divisible by {n}; "
                                 f"this model has {value}: use a rank count that divides it")
    else:
        if not hasattr(getattr(base, "model", None), "pipeline"):
            raise ShardError(f"mlx-lm cannot pipeline {base.model_type!r} models (--shard pipeline "
                             f"works for {', '.join(capable_families('pipeline')) or 'none'})")
        if len(base.model.layers) < n:
            raise ShardError(f"--shard pipeline needs at least one layer per rank: "
                             f"{len(base.model.layers)} layers, {n} ranks")


COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "send", "recv", "recv_like")


@contextmanager
def counting_collectives() -> Iterator[Dict[str, int]]:
    """Count the collective operations issued inside the block, by name.

    Every call of ``mx.distributed.<op>`` builds one operation in the graph (the
    sharded linears' ``all_sum``, a pipeline's ``send``/``recv``, ``RankCheck``'s
    ``all_gather``); on a real cluster each costs a network round.
    """
    counts = {name: 0 for name in COLLECTIVES if hasattr(mx.distributed, name)}
    originals = {name: getattr(mx.distributed, name) for name in counts}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in counts:
        setattr(mx.distributed, name, counted(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(mx.distributed, name, fn)


def pipeline_owners(base, world, num_layers: int) -> list:
    """After ``base.model.pipeline(world)``: pad the layer list to ``num_layers`` (mlx-lm
    keeps it only up to this stage's last layer) and return the rank holding each layer."""
    inner = base.model
    inner.layers.extend([None] * (num_layers - len(inner.layers)))
    rows = _gather([inner.start_idx, inner.end_idx], world)
    owners = [-1] * num_layers
    for rank, (start, end) in enumerate(rows.tolist()):
        for i in range(start, end):
            owners[i] = rank
    if -1 in owners:
        raise ShardError(f"the pipeline stages do not cover every layer: {rows.tolist()}")
    return owners


def is_main() -> bool:
    """Whether this process prints, writes and serves: rank 0, or the only process."""
    return mx.distributed.init().rank() == 0


def settle() -> None:
    """Wait for the default stream and mlx-lm's generation stream (see ``_gather``)."""
    from mlx_lm.generate import generation_stream

    mx.synchronize()
    mx.synchronize(generation_stream)


def _gather(values: Sequence[int], world) -> np.ndarray:
    """Every rank's ``values`` (ints), one row per rank.

    Waits for every stream first: mlx-lm decodes on a stream of its own and leaves the
    next token's forward (with its collectives) queued there, and collectives from two
    streams could pair up differently on different ranks.
    """
    settle()
    local = mx.array(np.asarray(values, dtype=np.int64).astype(np.int32).reshape(1, -1))
    return np.array(mx.distributed.all_gather(local, group=world, stream=mx.cpu))


def agree_seed(seed: Optional[int], world) -> int:
    """Rank 0's seed (a fresh one when ``None``) on every rank, and ``mx.random`` seeded with it.

    Sent as three 21-bit words (the gather carries int32), so any seed in ``0 .. 2**63 - 1``
    arrives whole and a sharded run seeds exactly as a single process does.
    """
    if world.rank() == 0 and seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    seed = int(seed or 0)
    words = [(seed >> 42) & 0x1FFFFF, (seed >> 21) & 0x1FFFFF, seed & 0x1FFFFF]
    hi, mid, lo = (int(w) for w in _gather(words, world)[0])
    agreed = (hi << 42) | (mid << 21) | lo
    mx.random.seed(agreed)
    return agreed


def checkpoint_fingerprint(path: Path) -> str:
    """A hash of what a rank loads from ``path``: the small files whole, each weight
    file's name, size, safetensors header and first and last MiB (weights are too big
    to hash in full at every start)."""
    path = Path(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(item.name.encode())
        size = item.stat().st_size
        if item.suffix != ".safetensors" or size <= 2 << 20:
            digest.update(item.read_bytes())
            continue
        with item.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
            digest.update(size.to_bytes(8, "little") + f.read(min(header, 1 << 24)) + f.read(1 << 20))
            f.seek(-(1 << 20), 2)
            digest.update(f.read())
    return digest.hexdigest()


def check_same_checkpoint(path: Optional[Path], world, failure: Optional[BaseException] = None) -> None:
    """Stop unless every rank's ``path`` holds the same checkpoint.

    A rank that could not even read its checkpoint (``failure``, ``path`` None) still takes
    part in the gather, so every rank stops instead of waiting for it.

    Raises:
        ShardError: naming the ranks whose files differ from rank 0's, or could not be read.
    """
    if failure is None:
        mine = checkpoint_fingerprint(path)
        words = [int(mine[i : i + 7], 16) for i in range(0, 56, 7)]  # 8 words of 28 bits
    else:
        words = [-1] * 8
    rows = _gather(words, world)
    broken = [r for r in range(rows.shape[0]) if (rows[r] == -1).all()]
    if broken:
        raise ShardError(f"ranks {broken} could not read the checkpoint"
                         + (f" ({failure})" if failure is not None else "")
                         + ": copy the same model folder to every machine (same files, same --model)")
    differ = [r for r in range(rows.shape[0]) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise ShardError(f"ranks {differ} load a different checkpoint from rank 0 (at {path}): copy the "
                         "same model folder to every machine (same files, same --model)")


def check_prompt_fits(tokens: Sequence[int], max_tokens: int, max_context: Optional[int], world) -> None:
    """Stop on every rank when the ranks' prompts differ (before the prefill, whose shapes
    would not match), or the prompt plus the tokens asked for is over the context on any rank.

    Raises:
        ShardError: the prompts differ (a prompt read from stdin, another chat template).
        ContextOverflowError: naming the ranks (every rank raises it, so none waits on the others).
    """
    from .config import ContextOverflowError

    prompt = np.asarray(tokens, dtype=np.int64)
    checksum = int((prompt * np.arange(1, prompt.size + 1)).sum() % (2**31 - 1))
    needed = len(prompt) + max_tokens
    rows = _gather([needed, -1 if max_context is None else max_context, len(prompt), checksum], world)
    if not (rows[:, 2:] == rows[0, 2:]).all():
        raise ShardError(f"the ranks were given different prompts (length, checksum per rank: "
                         f"{rows[:, 2:].tolist()}): give every rank the same prompt (not stdin)")
    rows = rows[:, :2]
    over = [r for r, (n, ctx) in enumerate(rows) if ctx >= 0 and n > ctx]
    if over:
        raise ContextOverflowError(
            f"prompt + max tokens ({int(rows[over[0], 0])}) exceeds the model's context of "
            f"{int(rows[over[0], 1])} tokens on ranks {over}: shorten the prompt or lower --max-tokens")


class Channel:
    """Rank 0's decisions, passed to every rank (the server: which request runs, when it stops)."""

    def __init__(self, world) -> None:
        self.world = world

    def share(self, value=None):
        """Rank 0's ``value`` (JSON-able, ``None`` included) on every rank; others pass anything."""
        main = self.world.rank() == 0
        data = np.frombuffer(json.dumps(value).encode(), np.uint8) if main else np.zeros(0, np.uint8)
        size = int(_gather([data.size], self.world)[0, 0])
        buffer = np.zeros(size, np.int32)
        if main:
            buffer[:] = data
        rows = np.array(mx.distributed.all_gather(mx.array(buffer.reshape(1, -1)), group=self.world,
                                                  stream=mx.cpu))
        return json.loads(rows[0].astype(np.uint8).tobytes().decode())

    def flag(self, value: bool = False) -> bool:
        """Rank 0's ``value`` on every rank."""
        return bool(_gather([int(value)], self.world)[0, 0])


class RankCheck:
    """A drafter that proposes what the wrapped one does, after checking that every
    rank has the same history and the same draft (one small ``all_gather`` per step).

    Raises (from ``propose``):
        ShardError: at the first step where the ranks' tokens differ.
    """

    def __init__(self, inner, world) -> None:
        self.inner = inner
        self.world = world
        self.uses_streams = inner.uses_streams
        self.max_depth = inner.max_depth
        self.stream_logits_depth = inner.stream_logits_depth

    def observe(self, out, node: int, stream_logits=None) -> None:
        self.inner.observe(out, node, stream_logits)

    def propose(self, history: Sequence[int], budget: int):
        draft = self.inner.propose(history, budget)
        tail = np.asarray(history[-64:], dtype=np.int64)
        weights = np.arange(1, tail.size + 1, dtype=np.int64)
        fingerprint = [len(history), int((tail * weights).sum() % (2**31 - 1)), draft.tree.size]
        if draft.tree.size > 1:
            tokens = np.array(draft.tokens).astype(np.int64)
            fingerprint.append(int((tokens * np.arange(1, tokens.size + 1)).sum() % (2**31 - 1)))
        else:
            fingerprint.append(0)
        rows = _gather(fingerprint, self.world)
        if not (rows == rows[0]).all():
            raise ShardError(f"the ranks diverged after {len(history)} tokens (history length, checksum, "
                             f"tree size, draft checksum per rank: {rows.tolist()}); this is a bug: "
                             "report it with the command line")
        return draft

