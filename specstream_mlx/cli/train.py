"""``specstream-mlx train``: option parsing only (the work is ``train.loop``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import (
    DEFAULT_ADAPTER_RANK, DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS, DEFAULT_STREAM_LORA_RANK, MODES,
)
from .app import UsageError, _run, app, model_or_default


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="SS checkpoint, or a plain model (fresh streams)."),
    data: str = typer.Option(..., "--data", help="JSONL file or folder (train.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    mode: Optional[str] = typer.Option(None, help=f"{' | '.join(MODES)} (default: the checkpoint's; fresh streams: {DEFAULT_MODE})."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation JSONL."),
    data_tokens: Optional[int] = typer.Option(
        None, "--data-tokens", min=1,
        help="Train on the first examples of --data (file order) that hold this many target "
             "tokens within --max-seq-len (a data learning curve; default: all)."),
    gamma: Optional[int] = typer.Option(None, help=f"Streams, for fresh streams (default {DEFAULT_GAMMA})."),
    stream_layers: Optional[int] = typer.Option(
        None, "--stream-layers", help=f"MSA layers, for fresh streams (default {DEFAULT_STREAM_LAYERS})."),
    adapter_rank: Optional[int] = typer.Option(
        None, "--adapter-rank", help=f"Stream adapter rank, for fresh streams (default {DEFAULT_ADAPTER_RANK})."),
    stream_lora_rank: Optional[int] = typer.Option(
        None, "--stream-lora-rank",
        help="Rank of LoRA on the MSA layers' projections for stream rows only, for fresh "
             f"lossless streams (default {DEFAULT_STREAM_LORA_RANK}: none). Main rows keep the base weights."),
    fresh_streams: bool = typer.Option(
        False, "--fresh-streams",
        help="--model is a checkpoint: keep its base model, train new streams with the settings "
             "given here instead of continuing its own."),
    iters: int = typer.Option(1000, help="Training steps."),
    batch_size: int = typer.Option(4, "--batch-size"),
    max_seq_len: int = typer.Option(512, "--max-seq-len"),
    learning_rate: float = typer.Option(5e-4, "--learning-rate"),
    embedding_lr: Optional[float] = typer.Option(
        None, "--embedding-lr",
        help="Own learning rate for the stream embeddings (they must move on the scale of the "
             "residual stream; adapters want ~1e-3). Default: --learning-rate."),
    warmup: int = typer.Option(50, help="Linear warm-up steps."),
    schedule: str = typer.Option("cosine", help="cosine | constant"),
    stream_weight: float = typer.Option(0.1, "--stream-weight", help="alpha_j of each stream."),
    main_weight: Optional[float] = typer.Option(None, "--main-weight", help="alpha_0 (lossless: 0, shared: 1)."),
    exit_weight: float = typer.Option(0.1, "--exit-weight", help="Early-exit (pruning) loss weight."),
    lora_rank: int = typer.Option(32, "--lora-rank", help="LoRA rank (shared mode)."),
    medusa_heads: int = typer.Option(
        0, "--medusa-heads", min=0,
        help="Shared mode: train this many Medusa heads with the LoRA (Medusa-2, the paper's "
             "peer; add --stream-weight 0 for heads alone). Medusa-1 on a frozen base is "
             "`train-heads --kind medusa`."),
    medusa_weight: float = typer.Option(
        0.2, "--medusa-weight", help="Medusa-2's lambda_0: head k's loss weight is this x 0.8^(k-1)."),
    save_every: int = typer.Option(100, "--save-every"),
    val_every: int = typer.Option(0, "--val-every", help="Decode validation prompts every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    distill: bool = typer.Option(False, "--distill", help="Targets = the base model's greedy output."),
    distill_max_tokens: int = typer.Option(128, "--distill-max-tokens"),
    cached: Optional[bool] = typer.Option(
        None, "--cached/--no-cached",
        help="Compute the frozen layers once (lossless: the whole main stream, training stream "
             "rows only; shared: the layers below the multi-stream layers). Default on."),
    positions: Optional[int] = typer.Option(
        None, "--positions",
        help="Cached training: streams of this many random positions per example and step "
             "(default: all); cheaper steps, so more examples per step."),
    cache_dtype: Optional[str] = typer.Option(
        None, "--cache-dtype",
        help="Cached lossless training: store the main stream as float16 | bfloat16 | float32 "
             "(default: the model's type). float16 halves a float32 model's cache, for large corpora."),
    group_by_length: bool = typer.Option(
        True, "--group-by-length/--no-group-by-length",
        help="Batch examples of similar length together (less padding), as mlx-lm's trainer does."),
    seed: int = typer.Option(0),
):
    """Fine-tune the streams (lossless) or streams + LoRA (shared mode)."""
    from ..train.data import first_target_tokens, load_examples
    from ..train.distill import distill as run_distill
    from ..bench.evaluate import speed_on_prompts
    from ..config import read_config
    from ..loading import load_for_training
    from ..train.losses import LossWeights
    from ..train.loop import STATE_JSON, TrainConfig, check_medusa_mode, train as run_train

    def run():
        # Checked before any loading; the loss weights follow the model's mode, below.
        config = TrainConfig(
            iters=iters, batch_size=batch_size, max_seq_len=max_seq_len,
            learning_rate=learning_rate, embedding_lr=embedding_lr, warmup=warmup,
            schedule=schedule, lora_rank=lora_rank, seed=seed, save_every=save_every,
            positions=positions, cache_dtype=cache_dtype, val_every=val_every if val_data else 0,
            group_by_length=group_by_length, medusa_heads=medusa_heads,
        )
        if out.exists() and not resume:
            raise UsageError(f"{out} exists: pass --resume to continue it, or choose another --out")
        if data_tokens is not None and distill:
            raise UsageError("--data-tokens counts the targets of --data, and --distill replaces "
                             "them: distill first (specstream-mlx distill), then train on the corpus")
        if resume and not (out / STATE_JSON).is_file():
            raise UsageError(f"--resume: {out} holds no training checkpoint")
        source, fresh = model, fresh_streams
        settings = {"gamma": gamma, "stream_layers": stream_layers, "adapter_rank": adapter_rank,
                    "stream_lora_rank": stream_lora_rank}
        if resume:  # the checkpoint in --out knows what it was started with
            state = json.loads((out / STATE_JSON).read_text())
            source, fresh = state["base_dir"], state.get("fresh_streams", False)
            if state.get("data_tokens") != data_tokens:
                def said(n):
                    return "all of --data" if n is None else f"--data-tokens {n}"
                raise UsageError(f"--resume: {out} was trained on {said(state.get('data_tokens'))}, "
                                 f"not {said(data_tokens)}: resume with the same data")
            own = read_config(out)
            settings = {"gamma": own.gamma, "stream_layers": own.stream_layers,
                        "adapter_rank": own.stream_adapter_rank,
                        "stream_lora_rank": own.stream_lora_rank}
        ss_model, tokenizer, base_dir = load_for_training(
            source, mode=mode, seed=seed, fresh_streams=fresh, **settings)
        shared = ss_model.config.shared
        check_medusa_mode(ss_model, config)  # before any data loading or distillation
        use_cache = True if cached is None else cached
        for given, option in ((positions, "--positions"), (cache_dtype, "--cache-dtype")):
            if given is not None and (shared or not use_cache):
                raise UsageError(f"{option} works with cached training in lossless mode only")
        examples = load_examples(data, tokenizer)
        if data_tokens is not None:
            examples = first_target_tokens(examples, data_tokens, max_seq_len)
        if distill:
            out.parent.mkdir(parents=True, exist_ok=True)
            cache = out.parent / f"{out.name}.distilled.jsonl"
            examples = run_distill(ss_model.base, tokenizer, examples, distill_max_tokens,
                                   cache_file=cache)
        validate = None
        if val_data:
            val = load_examples(val_data, tokenizer, split="valid")[:4]
            prompts = [list(e.tokens[: e.loss_start or len(e.tokens) // 2]) for e in val]
            validate = lambda m: speed_on_prompts(m, tokenizer, prompts)  # noqa: E731
        weights = LossWeights(
            main=main_weight if main_weight is not None else (1.0 if shared else 0.0),
            stream=stream_weight, early_exit=exit_weight, medusa=medusa_weight,
        )
        config.weights = weights
        figures = run_train(ss_model, examples, config, base_dir, out,
                            resume=out if resume else None, validate=validate, cached=use_cache,
                            extra_state={"fresh_streams": fresh, "data_tokens": data_tokens})
        typer.echo(json.dumps(figures, indent=2))

    _run(run, ctx)


@app.command("train-heads")
def train_heads_command(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="Checkpoint (or plain mlx-lm model) whose base the heads draft for."),
    data: str = typer.Option(..., "--data", help="JSONL file or folder (train.jsonl), as for train."),
    data_tokens: Optional[int] = typer.Option(
        None, "--data-tokens", min=1,
        help="Train on the first examples of --data (file order) that hold this many target "
             "tokens within --max-seq-len (a data learning curve; default: all)."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint: --model's files plus the head's (medusa.* or eagle.*)."),
    kind: str = typer.Option("medusa", "--kind", help="medusa (K heads, head k drafts k+1 tokens ahead) | "
                             "eagle (one decoder layer drafting features autoregressively)."),
    num_heads: int = typer.Option(3, "--num-heads", help="Medusa heads (head k drafts k+1 tokens ahead)."),
    iters: int = typer.Option(1000, help="Training steps."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_seq_len: int = typer.Option(512, "--max-seq-len"),
    learning_rate: float = typer.Option(1e-3, "--learning-rate"),
    warmup: int = typer.Option(20, help="Linear warm-up steps."),
    save_every: int = typer.Option(100, "--save-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    seed: int = typer.Option(0),
):
    """Train a peer method's draft head on a frozen base (lossless): `--drafts medusa` or `--drafts eagle`."""

    def run():
        from ..loading import load, resolve_path
        from ..train.data import first_target_tokens, load_examples
        from ..train.heads import HeadsTrainConfig, train_heads

        config = HeadsTrainConfig(kind=kind, num_heads=num_heads, iters=iters, batch_size=batch_size,
                                  max_seq_len=max_seq_len, learning_rate=learning_rate, warmup=warmup,
                                  seed=seed, save_every=save_every, data_tokens=data_tokens)
        if out.exists() and not resume:
            raise UsageError(f"{out} exists: pass --resume to continue it, or choose another --out")
        source = resolve_path(model_or_default(model))
        ss_model, tokenizer = load(str(source))
        examples = load_examples(data, tokenizer)
        if data_tokens is not None:
            examples = first_target_tokens(examples, data_tokens, max_seq_len)
        figures = train_heads(ss_model, examples, config, source, out, resume=resume)
        typer.echo(json.dumps({"out": str(out), **figures}, indent=2))

    _run(run, ctx)
