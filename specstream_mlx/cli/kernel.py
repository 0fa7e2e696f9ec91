"""``specstream-mlx bench-kernel``: option parsing only (the work is ``kernels_metal.bench``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_GAMMA
from .app import UsageError, _parse_ints, _run, app


@app.command("bench-kernel")
def bench_kernel(
    tree_sizes: str = typer.Option("4,16,40", "--tree-sizes", help="Tree nodes, comma-separated."),
    prefixes: str = typer.Option("0,512,2048", "--prefixes", help="Cached prefix lengths."),
    gamma: int = typer.Option(DEFAULT_GAMMA, help="Stream rows per node (multi-stream layer)."),
    heads: int = typer.Option(32, help="Query heads."),
    kv_heads: int = typer.Option(8, "--kv-heads", help="Key/value heads."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head dimension (64/96/128/256)."),
    dtype: Optional[str] = typer.Option(None, help="float16 | bfloat16 | float32 (default: float16 on a GPU, float32 on the CPU)."),
    repeats: int = typer.Option(20, help="Timed repetitions per configuration."),
    window: Optional[int] = typer.Option(None, help="Sliding window of the layer."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
):
    """Time fused tree attention against the reference (SDPA + dense mask)."""

    def run():
        import mlx.core as mx

        from ..kernels_metal import bench, launch

        sizes = _parse_ints(tree_sizes, "--tree-sizes")
        lengths = _parse_ints(prefixes, "--prefixes")
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise UsageError(f"--heads ({heads}) must be a positive multiple of --kv-heads ({kv_heads})")
        if any(n < 1 for n in sizes):
            raise UsageError("--tree-sizes must be >= 1")
        chosen = dtype or ("float16" if mx.default_device().type == mx.DeviceType.gpu else "float32")
        typer.echo(f"[bench-kernel] backend {launch.backend() or 'cpu'}, {chosen}, heads {heads}/{kv_heads}, "
                   f"head dim {head_dim}, gamma {gamma}, median of {repeats}", err=True)
        results = bench.run(sizes, lengths, gamma, heads, kv_heads, head_dim, chosen, repeats, window)
        typer.echo(bench.format_table(results))
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2) + "\n")

    _run(run)
