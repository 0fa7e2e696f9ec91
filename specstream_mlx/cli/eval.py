"""``specstream-mlx eval``: option parsing only (the work is ``bench.evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..atomic import atomic_write_text
from .app import _run, app, model_or_default


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint to evaluate, HF repo id or smollm2-135m (default: the embedded model)."),
    data: str = typer.Option(..., "--data", help="JSONL with prompt/completion or messages."),
    metric: str = typer.Option(
        "rouge", help="rougeL (= rouge: ROUGE-L F1) | rouge1 (ROUGE-1 F1) | exact (SQL exact match "
                      "after whitespace and case normalisation). ROUGE: best over a record's "
                      "references; both ROUGE-1 and ROUGE-L are reported."),
    limit: Optional[int] = typer.Option(None, "--num", help="Only the first N examples."),
    max_tokens: int = typer.Option(128, "-m", "--max-tokens"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON."),
    no_spec: bool = typer.Option(False, "--no-spec",
                                 help="Plain decoding (same text in lossless mode; for untrained streams)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1,
        help="Decode N examples at a time with mlx-lm's batch_generate: the model's plain greedy "
             "text (what speculative decoding emits), much quicker for quality on a large set; "
             "no tokens per forward."),
):
    """Task quality and tokens per forward on a JSONL set."""
    from ..bench.evaluate import evaluate, evaluate_batched
    from ..drafters import make_drafter
    from ..loading import load, load_mlx_lm

    def run():
        if batch_size is not None:
            base, tokenizer = load_mlx_lm(model_or_default(model))
            figures = evaluate_batched(base, tokenizer, data, metric, limit, max_tokens, batch_size)
        else:
            ss_model, tokenizer = load(model_or_default(model))
            figures = evaluate(ss_model, tokenizer, data, metric, limit, max_tokens,
                               make_drafter(ss_model, speculative=not no_spec))
        summary = {k: v for k, v in figures.items() if k not in ("scores", "outputs", "scores_by_metric")}
        typer.echo(json.dumps(summary, indent=2))
        if out is not None:
            atomic_write_text(out, json.dumps(figures, indent=2) + "\n")

    _run(run, ctx)
