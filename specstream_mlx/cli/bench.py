"""``specstream-mlx bench``: option parsing only (the work is ``bench.run``)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from .app import DEFAULT_WIDTHS, UsageError, _parse_widths, _run, app, model_or_default

_SWEEP_WIDTHS = "1;1,1;1,1,1;2,1;2,1,1;2,2,1;3,2,1;3,3,1"
_SWEEP_NODES = "4,8,16"


def _parse_sweep(widths: str, nodes: str):
    shapes = [_parse_widths(part) for part in widths.split(";") if part.strip()]
    try:
        caps = [int(n) for n in nodes.replace(" ", "").split(",") if n]
    except ValueError:
        raise UsageError(f"--sweep-max-nodes takes integers like 4,8,16 (0: no cap), got {nodes!r}")
    if not shapes or not caps or any(c < 0 for c in caps):
        raise UsageError("--sweep needs widths like '1,1,1;3,2,1' and node caps like 4,8,16")
    return shapes, [c or None for c in caps]


def _command_line(ctx: typer.Context) -> str:
    """The command with every option spelled out (defaults included), to re-run it."""
    parts = ["specstream-mlx", ctx.info_name or "bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False:
            continue
        option = max(param.opts, key=len)
        parts += [option] if value is True else [option, str(value)]
    return shlex.join(parts)


def _save_best_tree(results: dict, model_dir: Path) -> None:
    from ..bench.report import best_sweep
    from ..config import TreeSettings, save_backend_tree

    best = best_sweep(results)
    if best is None:
        raise UsageError("--save-tree: no sweep setting has a measured speedup; nothing saved")
    backend = results["environment"]["backend"]
    tree = TreeSettings(tuple(best["widths"]), best["max_nodes"], best["prune_threshold"])
    save_backend_tree(model_dir, backend, tree)
    typer.echo(f"saved tree {','.join(map(str, tree.widths))} (max nodes {tree.max_nodes or 'all'}, "
               f"{best['speedup']:.2f}x over ar) as the {backend} default in {model_dir}")


@app.command()
def bench(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint directory, HF repo id or smollm2-135m (default: the embedded model)."),
    data: str = typer.Option(..., "--data", help="JSONL: prompt, messages or text per line."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Only the first N prompts."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens", help="Tokens per prompt and method."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling (0 or 1: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed; prompt i uses seed + i for every method."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated from ar,ss,ss-chain,pld,ss-pld,draft,medusa,eagle (default: all but medusa and eagle, which need their heads; with --sweep: ar)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model for `draft` (default: 4-bit copy of the target)."),
    num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help="Drafts per step for `draft`."),
    tree_width: Optional[str] = typer.Option(None, "--tree-width", help=f"ss tree: children per depth, e.g. {DEFAULT_WIDTHS} (default: the checkpoint's)."),
    max_nodes: Optional[int] = typer.Option(None, "--max-nodes", help="ss tree: cap on rows (root included)."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", help="ss tree: early-exit pruning."),
    pld_ngram: int = typer.Option(3, "--pld-ngram", help="pld, ss-pld: longest n-gram to look up."),
    pld_tokens: int = typer.Option(4, "--pld-tokens", help="pld, ss-pld: lookup tokens per step."),
    sweep: bool = typer.Option(False, "--sweep", help="Also run ss over a grid of tree settings."),
    sweep_widths: str = typer.Option(_SWEEP_WIDTHS, "--sweep-widths", help="Sweep tree widths, ';'-separated."),
    sweep_max_nodes: str = typer.Option(_SWEEP_NODES, "--sweep-max-nodes", help="Sweep node caps (0: none)."),
    save_tree: bool = typer.Option(False, "--save-tree", help="With --sweep: store the fastest tree in the checkpoint as this backend's default."),
    warmup_tokens: int = typer.Option(16, "--warmup-tokens", help="Tokens of the warm-up run per method."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System message for every prompt."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template", help="Use the raw prompts."),
    device_report: bool = typer.Option(False, "--device-report", help="Backend, dtype, BLAS, bandwidth and the speed bound."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for results.json, results.md, results.png."),
    shard: Optional[str] = typer.Option(None, "--shard", help="tensor | pipeline: split the model across "
                                        "the processes `mlx.launch` started (rank 0 writes)."),
):
    """Speed of SS against mlx-lm and other speculative methods: table, JSON and plot."""

    def run():
        from ..bench.run import BenchSettings, parse_methods, run_bench
        from ..bench.report import format_table, write_outputs

        if save_tree and not sweep:
            raise UsageError("--save-tree keeps the best tree of a sweep: add --sweep")
        path = model_or_default(model)
        if save_tree and not Path(path).is_dir():
            raise UsageError(f"--save-tree writes into a local checkpoint folder; {path!r} is not "
                             "one (download it, e.g. with `huggingface-cli download`, and pass the folder)")
        try:  # BenchSettings checks every setting; refused here, they are bad options
            chosen = parse_methods(methods)
            if chosen is None:
                chosen = ["ar"] if sweep else None
            grid_widths, grid_nodes = _parse_sweep(sweep_widths, sweep_max_nodes) if sweep else ((), ())
            settings = BenchSettings(
                model=path, data=data, num_prompts=num_prompts, max_tokens=max_tokens, temp=temp,
                top_p=top_p, seed=seed, tree_widths=_parse_widths(tree_width), max_nodes=max_nodes,
                prune_threshold=prune_threshold, sweep_widths=grid_widths, sweep_max_nodes=grid_nodes,
                draft_model=draft_model,
                num_draft_tokens=num_draft_tokens, pld_max_ngram=pld_ngram, pld_tokens=pld_tokens,
                warmup_tokens=warmup_tokens, system_prompt=system_prompt,
                ignore_chat_template=ignore_chat_template, shard=shard,
                **({} if chosen is None else {"methods": chosen}),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        from ..shard import is_main

        results = run_bench(settings, device_report, **({} if is_main() else {"log": lambda _: None}))
        if not is_main():
            return
        results = {"command": _command_line(ctx), **results}
        files = write_outputs(results, out)
        typer.echo(format_table(results))
        typer.echo(f"wrote {', '.join(str(v) for k, v in files.items() if k != 'plot_skipped')}")
        if "plot_skipped" in files:
            typer.echo(f"note: {files['plot_skipped']}", err=True)
        if save_tree:
            _save_best_tree(results, Path(path))

    _run(run, ctx)
