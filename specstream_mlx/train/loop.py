"""Fine-tune the streams (lossless mode) or streams + LoRA (shared mode).

Checkpoints are written as a complete Speculative Streaming checkpoint plus
``training_state.json`` / ``training_state.safetensors`` (trainable weights and
optimizer state), into a temporary folder that replaces the previous one only
once complete, so an interrupted run leaves the last good checkpoint intact.
Batches are a pure function of (seed, step), so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..config import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from ..eagle import EAGLE_CONFIG
from ..heads import HEADS_CONFIG, MedusaHeads, heads_config_for, save_heads
from .data import Example, collate, training_batches
from .losses import LossWeights, loss_fn
from ..atomic import atomic_dir
from ..model import SpecStreamModel

STATE_JSON = "training_state.json"
STATE_WEIGHTS = "training_state.safetensors"


@dataclass
class TrainConfig:
    """Settings of a training run (saved with every checkpoint)."""

    iters: int = 1000
    batch_size: int = 4
    max_seq_len: int = 512
    learning_rate: float = 5e-4
    embedding_lr: Optional[float] = None  # stream embeddings' own rate (None: learning_rate)
    positions: Optional[int] = None  # cached training: random positions per example and step
    cache_dtype: Optional[str] = None  # cached lossless training: the main stream's stored type
    warmup: int = 50
    schedule: str = "cosine"  # or "constant"
    weights: LossWeights = field(default_factory=LossWeights)
    lora_rank: int = 32
    lora_scale: float = 2.0
    medusa_heads: int = 0  # shared mode: Medusa heads trained with the LoRA (Medusa-2)
    seed: int = 0
    save_every: int = 100
    report_every: int = 10
    val_every: int = 0
    val_prompts: int = 4
    val_max_tokens: int = 64
    group_by_length: bool = True  # batches of similar lengths (mlx-lm's trainer does the same)

    def __post_init__(self):
        """Refuse settings that cannot train (``ValueError`` naming the setting)."""
        for name in ("iters", "batch_size", "max_seq_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.medusa_heads < 0:
            raise ValueError(f"medusa_heads must be >= 0 (0: none), got {self.medusa_heads}")
        if self.positions is not None and self.positions < 1:
            raise ValueError(f"positions must be at least 1, got {self.positions}")
        for name in ("learning_rate", "embedding_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        from .cached import CACHE_DTYPES

        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")


def check_medusa_mode(model: SpecStreamModel, config: TrainConfig) -> None:
    """Medusa heads train with the LoRA in shared mode (Medusa-2) only (``ValueError`` otherwise)."""
    if config.medusa_heads and not model.config.shared:
        raise ValueError("--medusa-heads trains Medusa heads with the LoRA in shared mode (Medusa-2): "
                         "add --mode shared, or train heads on the frozen base (Medusa-1, lossless) "
                         "with `specstream-mlx train-heads --kind medusa`")


def make_trainable(model: SpecStreamModel, config: TrainConfig) -> None:
    """Freeze the base; unfreeze what the mode trains.

    Lossless: stream embeddings, pruning adapter, stream adapters, stream-row
    LoRA. Shared: the
    same plus LoRA (rank ``config.lora_rank``) on the top ``Ns`` layers, so
    gradients never need to flow through the frozen lower layers; with
    ``config.medusa_heads``, Medusa heads too (Medusa-2: heads and LoRA trained
    together, the main loss keeping the model's quality).
    """
    check_medusa_mode(model, config)
    model.freeze()
    if model.config.shared:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        linear_to_lora_layers(
            model.base, model.config.stream_layers,
            {"rank": config.lora_rank, "scale": config.lora_scale, "dropout": 0.0},
        )
    model.unfreeze(keys=["stream_embeddings"], recurse=False)
    model.prune_adapter.unfreeze()
    for adapter in model.stream_adapters:
        adapter.unfreeze()
    for lora in model.stream_lora:
        lora.unfreeze()
    if config.medusa_heads:
        heads = model.medusa
        if heads is None:
            heads = MedusaHeads(heads_config_for(model.base, config.medusa_heads))
        elif heads.config.num_heads != config.medusa_heads:
            raise ValueError(f"the checkpoint has {heads.config.num_heads} Medusa heads, not "
                             f"{config.medusa_heads}: train as many, or start from its base model")
        model.set_medusa(heads)
        model.medusa_training = heads  # also a child module while training, so its weights learn
        heads.unfreeze()


def trainable_names(model: nn.Module) -> List[str]:
    return [k for k, _ in tree_flatten(model.trainable_parameters())]


def _schedule(config: TrainConfig, lr: float):
    if config.schedule == "constant":
        main = lr
    elif config.schedule == "cosine":
        main = optim.cosine_decay(lr, max(1, config.iters - config.warmup), lr * 0.1)
    else:
        raise ValueError(f"schedule must be cosine or constant, got {config.schedule!r}")
    if config.warmup <= 0:
        return main
    warm = optim.linear_schedule(lr * 0.01, lr, config.warmup)
    main = main if callable(main) else (lambda step: lr)
    return optim.join_schedules([warm, main], [config.warmup])


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    """AdamW with the run's schedule; the stream embeddings may get their own rate.

    The table ``P`` is added to residual states of RMS ~10-100 and must move
    that far, while adapter / LoRA weights act on normalised inputs and want a
    rate ~1e-3: one rate cannot serve both (``--embedding-lr``).
    """
    main = optim.AdamW(learning_rate=_schedule(config, config.learning_rate), weight_decay=0.0)
    if config.embedding_lr is None:
        return main
    table = optim.AdamW(learning_rate=_schedule(config, config.embedding_lr), weight_decay=0.0)
    # MultiOptimizer: the last optimizer takes what no filter claims.
    return optim.MultiOptimizer([main, table], [lambda path, _: not path.startswith("stream_embeddings")])


def fused_base_weights(model: SpecStreamModel) -> dict:
    """Base weights with any LoRA layers fused in (the model itself is unchanged)."""
    weights = dict(tree_flatten(model.base.parameters()))
    for name, module in model.base.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            fused = module.fuse()
            for key in list(weights):
                if key.startswith(name + "."):
                    del weights[key]
            for key, value in tree_flatten(fused.parameters()):
                weights[f"{name}.{key}"] = value
    return weights


def save_checkpoint(model, optimizer, step: int, config: TrainConfig, base_dir: Path,
                    out: Path, extra: dict) -> None:
    """Write a complete checkpoint for ``step`` to ``out``, atomically."""
    from ..loading import save_streams

    with atomic_dir(Path(out)) as tmp:
        shared = model.config.shared
        for item in Path(base_dir).iterdir():
            if not item.is_file() or item.name.startswith((".", "training_state")):
                continue
            if item.name in (CONFIG_FILE, WEIGHTS_FILE) or (shared and item.suffix == ".safetensors"):
                continue
            if shared and item.name in ("model.safetensors.index.json", HEADS_CONFIG, EAGLE_CONFIG):
                continue  # draft heads made for the old base (Medusa-2's own are saved below)
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        if shared:
            mx.save_safetensors(str(tmp / "model.safetensors"), fused_base_weights(model),
                                metadata={"format": "mlx"})
        save_streams(model, tmp)
        if "medusa_training" in model:
            save_heads(model["medusa_training"], tmp)
        state = dict(tree_flatten(model.trainable_parameters()))
        state.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
        mx.save_safetensors(str(tmp / STATE_WEIGHTS), state)
        info = {"step": step, "config": asdict(config), "base_dir": str(base_dir), **extra}
        (tmp / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n")


def restore_state(model, optimizer, resume_dir: Path) -> int:
    """Load trainable weights and optimizer state saved by ``save_checkpoint``; return the step."""
    info_path = Path(resume_dir) / STATE_JSON
    if not info_path.is_file():
        raise CheckpointError(f"{resume_dir} has no {STATE_JSON}: not a training checkpoint")
    info = json.loads(info_path.read_text())
    state = mx.load(str(Path(resume_dir) / STATE_WEIGHTS))
    params = [(k, v) for k, v in state.items() if not k.startswith("optimizer.")]
    expected = set(trainable_names(model))
    if {k for k, _ in params} != expected:
        raise CheckpointError(f"{resume_dir}: saved trainable weights do not match this model")
    model.update(tree_unflatten(params))
    opt = [(k[len("optimizer."):], v) for k, v in state.items() if k.startswith("optimizer.")]
    optimizer.state = tree_unflatten(opt)
    return int(info["step"])


def _progress(step, total, loss, metrics, tps, lr, extra=""):
    width = 24
    done = int(width * step / max(total, 1))
    streams = " ".join(
        f"{k[0]}{k.split('_')[1]}={float(v):.2f}/{float(metrics[k.replace('loss', 'acc')]):.0%}"
        for k, v in sorted(metrics.items())
        if k.startswith(("stream_", "medusa_")) and k.endswith("loss")
    )
    print(
        f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss={loss:.3f} "
        f"{streams} lr={lr:.1e} {tps:.0f} tok/s{extra}",
        file=sys.stderr, flush=True, end="\n" if extra else "",
    )


def train(
    model: SpecStreamModel,
    examples: List[Example],
    config: TrainConfig,
    base_dir: Path,
    out: Path,
    resume: Optional[Path] = None,
    validate: Optional[Callable[[SpecStreamModel], dict]] = None,
    extra_state: Optional[dict] = None,
    cached: bool = False,
) -> dict:
    """Train ``model`` in place and write checkpoints to ``out``.

    Args:
        model: the model (its mode decides what trains).
        examples: tokenized training examples.
        config: run settings.
        base_dir: the directory whose base files checkpoints reuse.
        out: checkpoint directory (replaced atomically at every save).
        resume: a checkpoint written by this function to continue from.
        validate: optional callback returning figures (e.g. tokens per
            forward on validation prompts), run every ``val_every`` steps.
        extra_state: JSON-able facts stored with each checkpoint.
        cached: compute what the frozen layers compute once (``train.cached``):
            lossless mode caches the whole main stream and trains on stream
            rows alone; shared mode caches the hidden states below the
            multi-stream layers and runs only the top layers each step. The
            same loss either way, much faster.

    Returns:
        The last step's figures (``loss``, per-stream loss/accuracy, ``tokens_per_sec``).
    """
    vocab = model.config.vocab_size
    beyond = next((e for e in examples if e.tokens and max(e.tokens) >= vocab), None)
    if beyond is not None:
        raise ValueError(f"training data holds token id {max(beyond.tokens)}, beyond the model's "
                         f"vocabulary of {vocab}: it was tokenized (or distilled) for another model")
    make_trainable(model, config)
    optimizer = make_optimizer(config)
    start = 0
    if resume is not None:
        optimizer.init(model.trainable_parameters())
        start = restore_state(model, optimizer, resume)
    lowers = None
    if cached:
        from .cached import CACHE_DTYPES, CachedLoss, LowerCache, precompute

        examples = [Example(e.tokens[: config.max_seq_len], e.loss_start) for e in examples
                    if e.loss_start < min(len(e.tokens), config.max_seq_len) - 1]
        if not examples:
            raise ValueError(f"no example has a completion within --max-seq-len {config.max_seq_len}")
    if cached and not model.config.shared:
        mains = precompute(model, examples, CACHE_DTYPES.get(config.cache_dtype),
                           folder=out.parent / f"{out.name}.main-cache")  # reused by --resume
        objective = CachedLoss(model, mains, config.weights, seed=config.seed,
                               positions=config.positions)
        step_fn = nn.value_and_grad(model, objective)
    else:
        if cached:  # kept beside the checkpoint, so a resumed run skips the lower layers too
            lowers = LowerCache(model, examples, folder=out.parent / f"{out.name}.lower-cache")
        step_fn = nn.value_and_grad(
            model, lambda m, t, k, low=None: loss_fn(m, t, k, config.weights, low))
    order = training_batches(examples, config.batch_size, config.seed, start, config.max_seq_len,
                             config.group_by_length)
    figures: dict = {}
    tokens_seen, tic = 0, time.perf_counter()
    for step in range(start + 1, config.iters + 1):
        indices = next(order)
        if cached and lowers is None:
            (loss, metrics), grads = step_fn(model, indices, step)
            tokens_seen += sum(len(examples[i].tokens) for i in indices)
        else:
            tokens, mask = collate(examples, indices, config.max_seq_len)
            low = None if lowers is None else lowers.batch(indices, tokens.shape[1])
            (loss, metrics), grads = step_fn(model, mx.array(tokens), mask, low)
            tokens_seen += tokens.size
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss, metrics)
        if step % config.report_every == 0 or step == config.iters:
            tps = tokens_seen / (time.perf_counter() - tic)
            figures = {"step": step, "loss": loss.item(), "tokens_per_sec": tps,
                       **{k: v.item() for k, v in metrics.items()}}
            extra = ""
            if validate is not None and config.val_every and (
                step % config.val_every == 0 or step == config.iters
            ):
                figures.update(validate(model))
                extra = f" val tokens/forward={figures.get('val_tokens_per_forward', 0):.2f}"
            _progress(step, config.iters, figures["loss"], metrics, tps,
                      float(optimizer.learning_rate), extra)
            tokens_seen, tic = 0, time.perf_counter()
        if step % config.save_every == 0 or step == config.iters:
            save_checkpoint(model, optimizer, step, config, base_dir, out,
                            {**(extra_state or {}), "figures": figures})
            if lowers is not None:
                lowers.flush()
    print(file=sys.stderr)
    return figures
