"""``specstream-mlx convert``: option parsing only (the work is ``convert.pipeline.convert``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS, MODES
from .app import _run, app


@app.command("convert")
def convert_command(
    hf_path: Optional[str] = typer.Option(None, "--hf-path", "--model", help="Hugging Face model folder or repo id (safetensors or PyTorch .bin)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="A llama.cpp GGUF file (llama, qwen2, qwen3; F32/F16/BF16/Q4_0/Q4_1/Q8_0)."),
    streams: Optional[Path] = typer.Option(None, "--streams", help="PyTorch SS checkpoint with trained streams (default: fresh, untrained streams)."),
    mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Output checkpoint folder."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 | bfloat16 | float32 for float parameters (default: the source's)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the float layers."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Group size when quantizing."),
    dequantize: bool = typer.Option(False, "-d", "--dequantize", help="Turn GGUF-quantized layers into float ones."),
    gamma: int = typer.Option(DEFAULT_GAMMA, "--gamma", help="Streams, when --streams is not given."),
    stream_layers: int = typer.Option(DEFAULT_STREAM_LAYERS, "--stream-layers", help="Multi-stream layers, when --streams is not given."),
    mode: str = typer.Option(DEFAULT_MODE, "--mode", help=f"{' | '.join(MODES)}, when --streams is not given."),
    seed: int = typer.Option(0, "--seed", help="Seed for fresh streams (the same streams as `init` with this seed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --mlx-path if it exists."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision for repo ids."),
):
    """Convert a Hugging Face or GGUF model (+ PyTorch streams) into a checkpoint."""
    from ..convert.pipeline import convert

    out = _run(lambda: convert(
        hf_path, str(mlx_path), gguf=str(gguf) if gguf else None,
        streams=str(streams) if streams else None, dtype=dtype,
        quantize_bits=q_bits if quantize else None, q_group_size=q_group_size,
        dequantize_gguf=dequantize, gamma=gamma, stream_layers=stream_layers, mode=mode,
        seed=seed, overwrite=overwrite, revision=revision,
    ))
    typer.echo(f"wrote {out}")
