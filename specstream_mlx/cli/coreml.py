"""``specstream-mlx export-coreml``: option parsing only (the work is ``coreml.export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import UsageError, _parse_ints, _run, app


@app.command("export-coreml")
def export_coreml(
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint folder or HF repo id (default: the embedded SmolLM2-135M-Instruct)."),
    out: Path = typer.Option(..., "--out", help="Package to write, NAME.mlpackage."),
    max_context: int = typer.Option(1024, "--max-context", help="KV cache slots (prompt + output + one tree)."),
    tree_sizes: str = typer.Option("8,16,32", "--tree-sizes", help="Rows per call to support (enumerated shapes); the largest is the prefill chunk."),
    quantize: str = typer.Option("none", "--quantize", help="Weights: none | int8 (per channel) | int4 (blocks of 32)."),
    compute_units: str = typer.Option("all", "--compute-units", help="Suggested compute units: all | cpu_and_gpu | cpu_only | cpu_and_ne."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer id stored in the metadata (default: guessed from --model)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the traced-module vs MLX check before converting."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Export a checkpoint as a Core ML ML Program (macOS 15 / iOS 18, KV cache as state)."""

    def run():
        from ..coreml.export import ExportOptions, export_coreml as export

        sizes = _parse_ints(tree_sizes, "--tree-sizes")
        if any(s < 1 for s in sizes):
            raise UsageError(f"--tree-sizes must be positive, got {tree_sizes!r}")
        options = ExportOptions(
            max_context=max_context, tree_sizes=tuple(sizes), quantize=quantize,
            compute_units=compute_units, tokenizer=tokenizer, overwrite=overwrite, check=not no_check,
        )
        path = export(model, out, options, say=lambda m: typer.echo(f"[export-coreml] {m}", err=True))
        typer.echo(f"wrote {path}")

    _run(run)
