"""Training the peer methods' draft heads on a frozen base: Medusa heads
(``heads.py``) and the EAGLE-style head (``eagle.py``).

The base model is frozen (Medusa-1, EAGLE: lossless), so every example's final
hidden states are computed once (the whole-model version of the streams'
cached training) and each step runs only the head(s) and the shared LM head.

* Medusa: head ``k`` at position ``t`` is trained with cross-entropy against
  token ``t + 1 + k`` on the completion positions, averaged over heads.
* EAGLE: from ``(f_t, x_{t+1})`` the head predicts ``f_{t+1}``; the loss is
  EAGLE's: smooth L1 to the true feature plus 0.1 x the cross-entropy of the
  predicted feature's LM-head logits against ``x_{t+2}`` (teacher forcing: the
  inputs are the true features; at drafting time deeper depths read predicted
  ones).

Checkpoints (every ``save_every`` steps, atomically) are the input checkpoint's
files plus the head's files and the optimizer state, so ``--resume``
continues exactly and the output loads as a model with the head.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..atomic import atomic_dir
from ..config import CheckpointError
from ..eagle import EAGLE_CONFIG, EAGLE_WEIGHTS, EagleHead, eagle_config_for, load_eagle, save_eagle
from ..families import embed, lm_head
from ..heads import HEADS_CONFIG, HEADS_WEIGHTS, MedusaHeads, heads_config_for, load_heads, save_heads
from ..model import SpecStreamModel
from .data import Example, collate, training_batches

KINDS = ("medusa", "eagle")


def _state_files(kind: str) -> tuple:
    return f"{kind}_state.json", f"{kind}_state.safetensors"


@dataclass
class HeadsTrainConfig:
    kind: str = "medusa"
    num_heads: int = 3  # medusa only
    iters: int = 1000
    batch_size: int = 8
    max_seq_len: int = 512
    learning_rate: float = 1e-3
    warmup: int = 20
    seed: int = 0
    save_every: int = 100
    report_every: int = 10
    group_by_length: bool = True  # batches of similar lengths (mlx-lm's trainer does the same)
    data_tokens: Optional[int] = None  # the run trains on this prefix of its data (None: all of it)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("num_heads", "iters", "batch_size", "max_seq_len", "save_every", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def final_hidden(model: SpecStreamModel, examples: List[Example], max_seq_len: int) -> List[mx.array]:
    """Each example's final-norm hidden states ``(T, H)`` (the frozen base, computed once)."""
    states, tic = [], time.perf_counter()
    for i, example in enumerate(examples, start=1):
        tokens = mx.array(np.asarray(example.tokens[:max_seq_len], np.int32))[None]
        h = model.base.model(tokens)[0]  # mlx-lm's model: embeddings, layers, final norm
        mx.eval(h)
        states.append(h)
        if i % 50 == 0 or i == len(examples):
            print(f"\r[train-heads] hidden states {i}/{len(examples)} "
                  f"({i / (time.perf_counter() - tic):.1f}/s)", file=sys.stderr, end="", flush=True)
    print(file=sys.stderr)
    return states


def heads_loss(heads: MedusaHeads, base, hidden: mx.array, tokens: mx.array, mask: np.ndarray):
    """Mean over heads of head ``k``'s cross-entropy against token ``t + 1 + k``.

    Args:
        hidden: ``(B, T, H)`` final hidden states; tokens: ``(B, T)``; mask: ``(B, T)`` bool,
            True on target tokens.

    Returns:
        ``(loss, metrics)`` with ``head_k_loss`` and ``head_k_acc`` (top-1 accuracy).
    """
    total, metrics, used = mx.array(0.0), {}, 0
    length = tokens.shape[1]
    for k in range(1, heads.config.num_heads + 1):
        shift = 1 + k
        if length <= shift:
            break
        rows = np.flatnonzero(mask[:, shift:])
        if rows.size == 0:
            continue
        index = mx.array(rows.astype(np.int32))
        picked = hidden[:, : length - shift].reshape(-1, hidden.shape[-1])[index]  # (n, H)
        wanted = tokens[:, shift:].reshape(-1)[index]
        logits = lm_head(base, heads.blocks[k - 1](picked)).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, wanted).mean()
        metrics[f"head_{k}_loss"] = loss
        metrics[f"head_{k}_acc"] = (mx.argmax(logits, axis=-1) == wanted).mean()
        total, used = total + loss, used + 1
    return total / max(used, 1), metrics


def eagle_loss(head, base, family, hidden: mx.array, tokens: mx.array, mask: np.ndarray):
    """EAGLE's loss on a batch: smooth L1 of the predicted features plus 0.1 x CE of their logits.

    Args:
        hidden: ``(B, T, H)`` final features; tokens: ``(B, T)``; mask: ``(B, T)`` bool, True
            on target tokens. Position ``i`` reads ``(f_i, x_{i+1})`` and predicts ``f_{i+1}``
            (counted where ``x_{i+1}`` is a target) and ``x_{i+2}`` (where that is a target).
    """
    length = tokens.shape[1]
    if length < 3:
        zero = mx.array(0.0)
        return zero, {"feature_loss": zero, "token_loss": zero, "token_acc": zero}
    x = head.fc(mx.concatenate([hidden[:, :-1], embed(family, base, tokens[:, 1:]).astype(hidden.dtype)], axis=-1))
    predicted = head.layer(x, "causal")  # (B, T-1, H): predicted f_1 .. f_{T-1}
    feature_mask = mx.array(mask[:, 1:])
    count = mx.maximum(feature_mask.sum(), 1)
    l1 = nn.losses.smooth_l1_loss(predicted, hidden[:, 1:], reduction="none").mean(axis=-1)
    feature_loss = (l1 * feature_mask).sum() / count
    rows = np.flatnonzero(mask[:, 2:])
    if rows.size:
        index = mx.array(rows.astype(np.int32))
        picked = predicted[:, :-1].reshape(-1, predicted.shape[-1])[index]
        wanted = tokens[:, 2:].reshape(-1)[index]
        logits = lm_head(base, picked).astype(mx.float32)
        token_loss = nn.losses.cross_entropy(logits, wanted).mean()
        token_acc = (mx.argmax(logits, axis=-1) == wanted).mean()
    else:
        token_loss = token_acc = mx.array(0.0)
    return feature_loss + 0.1 * token_loss, {"feature_loss": feature_loss, "token_loss": token_loss,
                                              "token_acc": token_acc}


def _optimizer(config: HeadsTrainConfig) -> optim.Optimizer:
    decay = optim.cosine_decay(config.learning_rate, max(config.iters - config.warmup, 1), config.learning_rate * 0.1)
    if config.warmup:
        schedule = optim.join_schedules([optim.linear_schedule(1e-7, config.learning_rate, config.warmup), decay],
                                        [config.warmup])
    else:
        schedule = decay
    return optim.AdamW(learning_rate=schedule, weight_decay=0.0)


def _save(heads, optimizer, step: int, config: HeadsTrainConfig, source: Path, out: Path, figures: dict) -> None:
    state, state_weights = _state_files(config.kind)
    # the trained kind's files are rewritten; the other kind's, if the source has them, kept
    own = ({HEADS_CONFIG, HEADS_WEIGHTS} if config.kind == "medusa" else {EAGLE_CONFIG, EAGLE_WEIGHTS}) \
        | {state, state_weights}
    with atomic_dir(out) as tmp:
        for item in source.iterdir():
            if not item.is_file() or item.name.startswith(".") or item.name in own \
                    or item.name.startswith("training_state"):
                continue
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        if config.kind == "medusa":
            save_heads(heads, tmp)
        else:
            save_eagle(heads, tmp)
        mx.save_safetensors(str(tmp / state_weights), dict(tree_flatten(optimizer.state)))
        (tmp / state).write_text(json.dumps({"step": step, "config": asdict(config), "source": str(source),
                                             "figures": figures}, indent=2) + "\n")


def train_heads(model: SpecStreamModel, examples: List[Example], config: HeadsTrainConfig,
                source: Path, out: Path, resume: bool = False) -> dict:
    """Train ``config.kind`` draft heads for ``model``'s frozen base; checkpoints to ``out``.

    Args:
        source: the checkpoint folder ``model`` was loaded from (its files are reused).
        resume: continue from the checkpoint in ``out``.

    Returns:
        The last report's figures.
    """
    vocab = model.base.args.vocab_size
    if any(e.tokens and max(e.tokens) >= vocab for e in examples):
        raise ValueError(f"training data holds token ids beyond the model's vocabulary of {vocab}")
    examples = [Example(e.tokens[: config.max_seq_len], e.loss_start) for e in examples
                if e.loss_start < min(len(e.tokens), config.max_seq_len) - 2]
    if not examples:
        raise ValueError(f"no example has two completion tokens within max_seq_len {config.max_seq_len}")
    medusa = config.kind == "medusa"
    if medusa:
        heads = MedusaHeads(heads_config_for(model.base, config.num_heads))
        loss = lambda h, x, t, m: heads_loss(h, model.base, x, t, m)  # noqa: E731
    else:
        heads = EagleHead(model.base, eagle_config_for(model.base))
        loss = lambda h, x, t, m: eagle_loss(h, model.base, model.family, x, t, m)  # noqa: E731
    optimizer = _optimizer(config)
    start = 0
    if resume:
        state, state_weights = _state_files(config.kind)
        state_file = Path(out) / state
        if not state_file.is_file():
            raise CheckpointError(f"{out} has no {state}: nothing to resume")
        loaded = load_heads(out, model.base) if medusa else load_eagle(out, model.base)
        if loaded is None or (medusa and loaded.config.num_heads != config.num_heads):
            raise CheckpointError(f"{out} holds no {config.kind} head matching these settings")
        heads = loaded
        # heads train in float32 whatever the base's dtype (load casts them to it)
        heads.update(tree_map(lambda a: a.astype(mx.float32), heads.parameters()))
        optimizer.init(heads.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(Path(out) / state_weights)).items()))
        saved = json.loads(state_file.read_text())
        if saved["config"].get("data_tokens") != config.data_tokens:
            raise CheckpointError(f"{out} was trained on --data-tokens {saved['config'].get('data_tokens')} "
                                  f"(None: all of the data), not {config.data_tokens}: resume with the same data")
        start = int(saved["step"])
    hidden = final_hidden(model, examples, config.max_seq_len)
    step_fn = nn.value_and_grad(heads, loss)
    order = training_batches(examples, config.batch_size, config.seed, start, config.max_seq_len,
                             config.group_by_length)
    figures, seen, tic = {}, 0, time.perf_counter()
    for step in range(start + 1, config.iters + 1):
        indices = next(order)
        tokens, mask = collate(examples, indices, config.max_seq_len)
        width = tokens.shape[1]
        batch = mx.stack([mx.pad(hidden[i][:width], [(0, width - min(width, hidden[i].shape[0])), (0, 0)])
                          for i in indices])
        (loss, metrics), grads = step_fn(heads, batch, mx.array(tokens), mask)
        optimizer.update(heads, grads)
        mx.eval(heads.parameters(), optimizer.state, loss, metrics)
        seen += int(mask.sum())
        if step % config.report_every == 0 or step == config.iters:
            tps = seen / (time.perf_counter() - tic)
            figures = {"step": step, "loss": loss.item(), "target_tokens_per_sec": tps,
                       **{k: v.item() for k, v in metrics.items()}}
            accs = (" ".join(f"h{k}={figures.get(f'head_{k}_acc', 0):.0%}" for k in range(1, config.num_heads + 1))
                    if medusa else f"feature={figures['feature_loss']:.3f} next={figures['token_acc']:.0%}")
            print(f"\r[{config.kind}] {step}/{config.iters} loss={figures['loss']:.3f} {accs} "
                  f"lr={float(optimizer.learning_rate):.1e} {tps:.0f} targets/s", file=sys.stderr, end="",
                  flush=True)
            seen, tic = 0, time.perf_counter()
        if step % config.save_every == 0 or step == config.iters:
            _save(heads, optimizer, step, config, Path(source), Path(out), figures)
    print(file=sys.stderr)
    return figures
