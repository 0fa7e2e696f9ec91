"""``specstream-mlx distill``: option parsing only (the work is ``train.distill``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import UsageError, _run, app, model_or_default


@app.command()
def distill(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(
        None, "--model",
        help="Model whose greedy answers become the targets: a plain mlx-lm model or a "
             "checkpoint (its base model). Default: the embedded model (smollm2-135m)."),
    prompts: str = typer.Option(
        ..., "--prompts",
        help='Prompt JSONL ("prompt", "messages" or "text" records; optional "max_tokens" '
             'and "source" fields).'),
    out: Path = typer.Option(
        ..., "--out",
        help="Corpus JSONL to append to; a rerun skips the prompts it already answers."),
    max_tokens: int = typer.Option(
        128, "--max-tokens", help="Answer tokens per prompt, unless its record says otherwise."),
    batch_size: int = typer.Option(48, "--batch-size", help="Prompts decoded together."),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Answer only the first N distinct prompts (a trial run)."),
):
    """Self-distillation: append the model's greedy answers to a training corpus.

    The corpus holds token ids ({"tokens", "loss_start"} per line: prompt, then
    answer, loss on the answer). See docs/distill.md.
    """
    from ..loading import _load_base, resolve_path
    from ..records import jsonl_files
    from ..train.distill import distill_corpus, read_prompts

    def run():
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
        if limit is not None and limit < 1:
            raise UsageError(f"--limit must be a positive integer, got {limit}")
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder: give the corpus JSONL file to append to")
        jsonl_files(prompts)  # a missing prompt file fails before the model loads
        base, tokenizer, _, _ = _load_base(resolve_path(model_or_default(model)), None)
        records = read_prompts(prompts, tokenizer, max_tokens)
        figures = distill_corpus(base, tokenizer, records, out, batch_size=batch_size,
                                 limit=limit)
        typer.echo(
            f"distilled {figures['answered']} prompts ({figures['already']} answered before, "
            f"{figures['duplicates']} duplicates skipped): {figures['tokens']} tokens generated "
            f"in {figures['seconds']:.1f} s, {figures['tokens_per_s']:.1f} tokens/s (prefill of "
            f"{figures['prompt_tokens']} prompt tokens included); {out} holds "
            f"{figures['corpus_records']} records, {figures['corpus_tokens']} answer tokens")

    _run(run, ctx)
