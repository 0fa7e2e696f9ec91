"""``convert``: a Hugging Face folder or a GGUF file (+ PyTorch streams) -> a checkpoint.

The output is an mlx-lm model folder (``config.json``, ``model.safetensors``,
tokenizer files) plus ``specstream.json`` and ``specstream.safetensors``. It is
written to a temporary sibling folder and renamed at the end, so a failed
conversion leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..config import DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS, SpecStreamConfig
from ..families import family_for
from .common import ConversionError, atomic_output, parse_dtype, say
from .hf_config import mlx_config, read_hf_config
from .hf_weights import read_weights
from .mlx_model import build_model, cast, dequantize, describe_quantization, quantize, save_base
from .streams import StreamWeights, check_fits, read_streams

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def _hf_source(hf_path: str, revision: Optional[str]):
    from ..loading import resolve_path

    src = resolve_path(hf_path, revision)
    hf_config = read_hf_config(src)
    config = mlx_config(hf_config)
    weights = read_weights(src)
    tokenizer_files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    tokenizer_files += sorted(src.glob("*.tiktoken"))
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") or f.suffix == ".tiktoken"
               for f in tokenizer_files):
        raise ConversionError(
            f"{src} has no tokenizer files (tokenizer.json, tokenizer.model, ...); "
            f"add the tokenizer of the model to the folder"
        )

    def write_tokenizer(out: Path) -> None:
        for file in tokenizer_files:
            shutil.copy2(file, out / file.name)

    return config, weights, write_tokenizer


def _gguf_source(gguf: str):
    from .gguf_reader import read_gguf
    from .gguf_tokenizer import write_tokenizer as write_gguf_tokenizer

    weights, config, meta, quantized = read_gguf(Path(gguf))
    if quantized:
        config["quantization"] = {"group_size": 32, "bits": 4, **quantized}
    return config, weights, lambda out: write_gguf_tokenizer(meta, out)


def _default_dtype(config: dict):
    name = config.get("torch_dtype")
    return getattr(mx, name) if name in ("float16", "bfloat16", "float32") else None


def _stream_config(streams: Optional[StreamWeights], config: dict, gamma: int,
                   stream_layers: int, mode: str) -> SpecStreamConfig:
    from ..loading import new_config

    extra = {}
    if streams is not None:
        gamma = streams.gamma
        stream_layers = int(streams.config.get("stream_layers", streams.adapter_count or stream_layers))
        mode = streams.config.get("mode", mode)
        down = streams.tensors.get("prune_adapter.down.weight")
        if down is not None:
            extra["prune_rank"] = int(down.shape[0])
    dims = (config["hidden_size"], config["vocab_size"], config["num_hidden_layers"])
    ss = new_config(dims, gamma, stream_layers, mode,
                    adapter_rank=streams.adapter_rank if streams else 0, **extra)
    try:
        ss.validate()
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    return ss


def copy_mlx_streams(folder: Path, config: dict, out: Path) -> SpecStreamConfig:
    """Copy ``specstream.json`` / ``.safetensors`` from an MLX checkpoint folder, checking they fit."""
    from ..config import CONFIG_FILE, WEIGHTS_FILE, read_config

    ss = read_config(folder)
    for name, have, want in (("hidden size", ss.hidden_size, config["hidden_size"]),
                             ("vocabulary size", ss.vocab_size, config["vocab_size"]),
                             ("layer count", ss.num_layers, config["num_hidden_layers"])):
        if have != want:
            raise ConversionError(
                f"the streams in {folder} were made for a base model with {name} {have}, "
                f"but the base model being converted has {want}"
            )
    shutil.copy2(folder / CONFIG_FILE, out / CONFIG_FILE)
    shutil.copy2(folder / WEIGHTS_FILE, out / WEIGHTS_FILE)
    return ss


def write_streams(base, model_type: str, ss_config: SpecStreamConfig,
                  streams: Optional[StreamWeights], out: Path, seed: int = 0) -> None:
    """Write ``specstream.json`` / ``.safetensors``: trained streams, or fresh ones from ``seed``.

    Fresh streams come from ``loading.fresh_model``, as ``specstream-mlx init``'s
    do: the same base and seed give the same streams. Trained streams without a
    pruning adapter keep the fresh one (the plain early exit).
    """
    from ..loading import fresh_model, save_streams

    model = fresh_model(base, family_for(model_type), ss_config, seed)
    if streams is not None:
        model.stream_embeddings = streams.tensors["stream_embeddings"].astype(mx.float32)
        for name in ("down", "up"):
            value = streams.tensors.get(f"prune_adapter.{name}.weight")
            if value is not None:
                getattr(model.prune_adapter, name).weight = value.astype(mx.float32)
        for i, adapter in enumerate(model.stream_adapters):
            for name in ("down", "up"):
                value = streams.tensors[f"stream_adapters.{i}.{name}.weight"]
                getattr(adapter, name).weight = value.astype(mx.float32)
    save_streams(model, out)


def convert(
    hf_path: Optional[str] = None,
    mlx_path: str = "mlx_model",
    *,
    gguf: Optional[str] = None,
    streams: Optional[str] = None,
    mlx_streams: Optional[Path] = None,
    dtype: Optional[str] = None,
    quantize_bits: Optional[int] = None,
    q_group_size: int = 64,
    dequantize_gguf: bool = False,
    gamma: int = DEFAULT_GAMMA,
    stream_layers: int = DEFAULT_STREAM_LAYERS,
    mode: str = DEFAULT_MODE,
    seed: int = 0,
    overwrite: bool = False,
    revision: Optional[str] = None,
    quiet: bool = False,
) -> Path:
    """Convert a model into a specstream-mlx checkpoint.

    Args:
        hf_path: Hugging Face model folder or hub repo id (safetensors, sharded
            safetensors, or PyTorch ``.bin``). Give this or ``gguf``.
        mlx_path: output folder (must not exist unless ``overwrite``).
        gguf: a llama.cpp GGUF file (Q4_0/Q4_1/Q8_0 tensors stay quantized).
        streams: a PyTorch SS checkpoint with trained streams; without it,
            fresh (untrained) streams are made from ``seed``.
        mlx_streams: instead, a folder with ``specstream.json`` and
            ``specstream.safetensors`` to copy (the package's own streams).
        dtype: float16 | bfloat16 | float32 for the float parameters
            (default: the source's).
        quantize_bits: quantize the float layers to this many bits (``None``: don't).
        q_group_size: quantization group size.
        dequantize_gguf: turn GGUF-quantized layers into float ones (``dtype``,
            default float16), computed in float32.
        gamma, stream_layers, mode: stream settings when ``streams`` is not given.
        seed: seed for fresh streams (``loading.fresh_model``, as ``init``). overwrite: replace ``mlx_path``.
        revision: hub revision for repo ids. quiet: no progress output.

    Returns:
        The output folder.

    Raises:
        ConversionError: bad, missing or mismatched input; existing output.
        UnsupportedArchitectureError: an architecture the runtime cannot drive.
    """
    if (hf_path is None) == (gguf is None):
        raise ConversionError("give exactly one source: --hf-path or --gguf")
    if quantize_bits is not None and dequantize_gguf:
        raise ConversionError("choose either --quantize or --dequantize, not both")
    out = Path(mlx_path)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; choose another --mlx-path or pass --overwrite")
    target = parse_dtype(dtype)
    trained = read_streams(streams) if streams is not None else None

    say(f"reading {hf_path or gguf}", quiet)
    if gguf is not None:
        config, weights, write_tokenizer = _gguf_source(gguf)
    else:
        config, weights, write_tokenizer = _hf_source(hf_path, revision)
    if trained is not None:
        check_fits(trained, config["hidden_size"], config["vocab_size"],
                   config["num_hidden_layers"], streams)
    ss_config = _stream_config(trained, config, gamma, stream_layers, mode)
    model = build_model(config, weights)
    del weights
    if dequantize_gguf:
        say("dequantizing", quiet)
        dequantize(model, target or mx.float16)
    cast(model, target or (None if gguf else _default_dtype(config)))
    config = describe_quantization(model, config)
    if quantize_bits is not None:
        say(f"quantizing to {quantize_bits} bits, group size {q_group_size}", quiet)
        config = quantize(model, config, quantize_bits, q_group_size)
    if target is not None:
        config["torch_dtype"] = dtype

    with atomic_output(out, overwrite) as tmp:
        say(f"writing {out}", quiet)
        save_base(model, config, tmp)
        write_tokenizer(tmp)
        if mlx_streams is not None:
            ss_config = copy_mlx_streams(Path(mlx_streams), config, tmp)
        else:
            write_streams(model, config["model_type"], ss_config, trained, tmp, seed)
    if trained is not None or mlx_streams is not None:
        kind = f"trained streams from {streams or mlx_streams}"
    else:
        kind = f"fresh untrained streams (seed {seed})"
    say(f"done: {out} (gamma={ss_config.gamma}, {kind})", quiet)
    return out
