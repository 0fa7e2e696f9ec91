"""``specstream-mlx init`` and ``specstream-mlx generate``: option parsing only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS, MODES
from .app import DEFAULT_WIDTHS, UsageError, _parse_widths, _read_prompt, _run, app, describe_runtime, model_or_default


@app.command()
def init(
    model: str = typer.Option(..., "--model", help="Base mlx-lm model directory or HF repo id."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory."),
    gamma: int = typer.Option(DEFAULT_GAMMA, help="Number of speculative streams."),
    stream_layers: int = typer.Option(DEFAULT_STREAM_LAYERS, "--stream-layers", help="Top layers with multi-stream attention."),
    mode: str = typer.Option(DEFAULT_MODE, help=" | ".join(MODES)),
    seed: int = typer.Option(0, help="Seed for the fresh stream parameters."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Turn a plain mlx-lm model into a checkpoint with fresh (untrained) streams."""
    from ..loading import init_checkpoint

    path = _run(lambda: init_checkpoint(
        model, str(out), gamma=gamma, stream_layers=stream_layers, mode=mode,
        seed=seed, overwrite=overwrite,
    ))
    typer.echo(f"wrote {path} (gamma={gamma}, stream layers={stream_layers}, mode={mode})")


@app.command()
def generate(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint directory or HF repo id (default: SmolLM2-135M-Instruct)."),
    prompt: str = typer.Option(..., "-p", "--prompt", help="Prompt text, or - to read stdin."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens", help="Maximum tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling (0 or 1: off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the top-k tokens (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System message."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template", help="Use the raw prompt."),
    no_spec: bool = typer.Option(False, "--no-spec", help="Plain one-token decoding (baseline)."),
    tree_width: Optional[str] = typer.Option(None, "--tree-width", help=f"Children per depth, e.g. {DEFAULT_WIDTHS} (default: the checkpoint's)."),
    max_nodes: Optional[int] = typer.Option(None, "--max-nodes", help="Cap on tree rows (root included)."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", help="Early-exit pruning threshold."),
    drafts: str = typer.Option("streams", "--drafts", help="streams (the method) | medusa | eagle (the "
                               "checkpoint's peer heads, trained with train-heads)."),
    lookup: int = typer.Option(0, "--lookup", help="Also draft up to N prompt-lookup tokens per step beside the tree (0: off)."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the statistics as JSON."),
    verbose: bool = typer.Option(False, "--verbose", help="Print backend, BLAS and dtype."),
    shard: Optional[str] = typer.Option(None, "--shard", help="tensor | pipeline: split the model across "
                                        "the processes `mlx.launch` started (rank 0 prints)."),
):
    """Generate text, printing it as it comes, then the statistics."""

    def run():
        if lookup and no_spec:
            raise UsageError("--lookup drafts tokens and --no-spec turns drafting off: give one of them")
        text = _read_prompt(prompt)
        widths = _parse_widths(tree_width)
        from ..config import TreeSettings, tree_settings
        from ..drafters import make_drafter
        from ..generate import format_stats, stream_generate
        from ..loading import load
        from ..prompts import format_prompt
        from ..verify import SamplingParams

        # The library's own checks, made before the load rather than after it.
        sampling = SamplingParams(temp=temp, top_p=top_p, top_k=top_k)
        TreeSettings(widths or TreeSettings().widths, max_nodes)
        from ..shard import check_mode, is_main

        check_mode(shard)
        ss_model, tokenizer = load(model_or_default(model), shard=shard)
        tree = tree_settings(ss_model.config, widths, max_nodes, prune_threshold)
        echo = typer.echo if is_main() else (lambda *a, **k: None)
        if verbose:
            echo(describe_runtime(ss_model, tree), err=True)
        full = format_prompt(tokenizer, text, system_prompt, ignore_chat_template)
        drafter = make_drafter(ss_model, tree, lookup=lookup, speculative=not no_spec, source=drafts)
        last = None
        for last in stream_generate(
            ss_model, tokenizer, full, max_tokens, sampling=sampling, seed=seed, drafter=drafter,
        ):
            echo(last.text, nl=False)
        echo()
        echo(format_stats(last))
        if stats_json is not None and is_main():
            stats_json.write_text(json.dumps(last.stats(), indent=2) + "\n")

    _run(run, ctx)
