"""``export-coreml``: an MLX Speculative Streaming checkpoint -> a Core ML ML Program.

Steps: load the checkpoint (float32), build the PyTorch reference from its
weights and wrap it in ``step.StepModule``, trace it, check the traced module
against the MLX runtime (``parity.compare``: prompt chunks, a tree step, a
non-contiguous commit, a step after it), convert (macOS 15 / iOS 18, float16,
key/value cache as state, enumerated row counts), optionally quantise the
weights, write the metadata, save into a temporary folder, read the saved
spec back (``package.check``), and only then move it to ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from . import CoreMLExportError, interface, quiet, require_coremltools, require_torch
from .host import Layout, Session, TorchBackend

QUANTIZE = ("none", "int8", "int4")
COMPUTE_UNITS = {"all": "ALL", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY",
                 "cpu_and_ne": "CPU_AND_NE"}
DEFAULT_TREE_SIZES = (8, 16, 32)
INT4_BLOCK = 32  # weights per int4 scale: 4 + 16/32 = 4.5 bits per weight
#: Largest difference to MLX (relative to the largest logit) accepted by the built-in check:
#: float32 computation with a float16 cache rounds keys/values to ~5e-4 relative.
CHECK_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ExportOptions:
    """What ``export_coreml`` makes.

    Attributes:
        max_context: cache slots ``C`` (prompt + output + one tree).
        tree_sizes: enumerated row counts; each gets a draft tree of that many nodes.
        quantize: none | int8 (per channel) | int4 (per block of 32).
        compute_units: suggested compute units stored in the metadata.
        tokenizer: tokenizer id for the metadata (default: guessed from the model).
        overwrite: replace an existing ``out``.
        check: compare the traced module with MLX before converting.
    """

    max_context: int = 1024
    tree_sizes: Sequence[int] = DEFAULT_TREE_SIZES
    quantize: str = "none"
    compute_units: str = "all"
    tokenizer: Optional[str] = None
    overwrite: bool = False
    check: bool = True


def tree_for_size(widths: Sequence[int], gamma: int, size: int):
    """A draft tree of exactly ``size`` nodes, shaped like ``widths`` where it can be.

    ``build_tree(widths, size)`` when the full ``widths`` tree has at least ``size``
    nodes; otherwise the smallest uniform tree ``(w,) * depth`` that does, cut to
    ``size`` nodes (most promising first, as ``build_tree`` does).
    """
    from ..tree import build_tree

    depth = max(1, min(len(widths), gamma))
    widths = tuple(widths[:depth])
    if size == 1:
        return build_tree(())
    full = build_tree(widths)
    if full.size < size:
        w = 1
        while build_tree((w,) * depth).size < size:
            w += 1
        widths = (w,) * depth
    return build_tree(widths, size)


def default_tree_size(config, sizes: Sequence[int]) -> int:
    """The enumerated size closest to the checkpoint's default tree (ties: the smaller)."""
    from ..tree import build_tree

    tree = config.default_tree("gpu-metal")  # Core ML runs on Apple silicon
    depth = max(1, min(len(tree.widths), config.gamma))
    nodes = build_tree(tuple(tree.widths[:depth]), tree.max_nodes).size
    return min(sizes, key=lambda s: (abs(s - nodes), s))


def parse_options(opts: ExportOptions) -> tuple:
    """Validated ``(sizes, quantize, compute_units)``; raises ``CoreMLExportError``."""
    sizes = sorted(set(int(s) for s in opts.tree_sizes))
    if not sizes or sizes[0] < 1:
        raise CoreMLExportError(f"tree sizes must be positive integers, got {list(opts.tree_sizes)}")
    if len(sizes) > 128:
        raise CoreMLExportError(f"Core ML takes at most 128 enumerated sizes, got {len(sizes)}")
    if opts.max_context < 2:
        raise CoreMLExportError(f"--max-context must be at least 2, got {opts.max_context}")
    if sizes[-1] >= opts.max_context:
        raise CoreMLExportError(
            f"tree size {sizes[-1]} does not fit a context of {opts.max_context} slots: every call "
            f"writes its rows behind the committed ones; raise --max-context or use smaller --tree-sizes"
        )
    if opts.quantize not in QUANTIZE:
        raise CoreMLExportError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {opts.quantize!r}")
    if opts.compute_units not in COMPUTE_UNITS:
        raise CoreMLExportError(
            f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}, got {opts.compute_units!r}"
        )
    return sizes, opts.quantize, opts.compute_units


def check_supported(model, max_context: int) -> None:
    """Raise ``CoreMLExportError`` for models the exported program cannot run."""
    if model.family.name == "gemma3_text" or any(w is not None for w in model.windows):
        raise CoreMLExportError(
            "cannot export this model: sliding-window attention layers (Gemma 3, Mistral/Qwen "
            "with a window) are not supported by the Core ML export yet"
        )
    limit = getattr(model.base.args, "max_position_embeddings", None)
    if limit and max_context > limit:
        raise CoreMLExportError(
            f"--max-context {max_context} exceeds the model's context of {limit} positions"
        )


def build_step(model, max_context: int, cache_dtype=None, compute_dtype=None):
    """The ``StepModule`` of an MLX ``SpecStreamModel`` (float32 unless ``compute_dtype``)."""
    from ..convert.common import ConversionError
    from ..convert.to_torch import to_reference
    from .step import StepModule

    try:
        ref = to_reference(model)
    except ConversionError as exc:
        raise CoreMLExportError(f"cannot export this model: {exc}") from None
    return StepModule(ref, max_context, model.config.gamma + 1, cache_dtype, compute_dtype).eval()


class _NoBackend:
    def reset(self) -> None:
        pass


def layout_for(model, sizes: Sequence[int], max_context: int, eos=()) -> Layout:
    """The host layout of an export of ``model`` (what its metadata will say)."""
    config = model.config
    widths = config.default_tree("gpu-metal").widths  # Core ML runs on Apple silicon
    trees = {s: tree_for_size(widths, config.gamma, s) for s in sizes}
    return Layout(
        gamma=config.gamma, max_context=max_context, commit_slots=config.gamma + 1,
        vocab_size=config.vocab_size, tree_sizes=tuple(sizes), trees=trees,
        tree_default=default_tree_size(config, sizes), eos_token_ids=tuple(eos),
    )


def trace_step(step, layout: Layout):
    """``torch.jit.trace`` of ``step`` on a prompt call of the largest size; state left empty."""
    torch = require_torch()
    size = layout.tree_sizes[-1]
    inputs = Session(_NoBackend(), layout).inputs(
        list(range(size)), np.arange(size), np.tril(np.ones((size, size), bool)))
    example = tuple(torch.from_numpy(inputs[interface.input_name(r)]) for r in
                    interface.interface()["inputs"])
    with torch.no_grad():
        traced = torch.jit.trace(step, example, check_trace=False)
    TorchBackend(traced).reset()
    return traced


def metadata(model, layout: Layout, quantize: str, compute_units: str, tokenizer: str) -> Dict[str, str]:
    """The ``specstream.*`` metadata of a package (string values, see interface.json)."""
    config = model.config
    trees = {str(s): {"parents": t.parents.tolist(), "depth": t.depth.tolist(), "rank": t.rank.tolist()}
             for s, t in layout.trees.items()}
    values = {
        "format_version": interface.FORMAT_VERSION, "interface_version": interface.version(),
        "interface": interface.text(), "gamma": config.gamma, "stream_layers": config.stream_layers,
        "mode": config.mode, "max_context": layout.max_context, "commit_slots": layout.commit_slots,
        "vocab_size": layout.vocab_size, "tree_sizes": ",".join(map(str, layout.tree_sizes)),
        "trees": json.dumps(trees, separators=(",", ":")), "tree_default": layout.tree_default,
        "tokenizer": tokenizer, "eos_token_ids": ",".join(map(str, layout.eos_token_ids)),
        "quantization": quantize, "compute_units": compute_units,
    }
    return {interface.meta_key(role): str(value) for role, value in values.items()}


def convert_traced(traced, layout: Layout, cache_shape: tuple):
    """``ct.convert`` of the traced step: ML Program, macOS 15 / iOS 18, float16."""
    ct = require_coremltools()
    sizes, c, k = layout.tree_sizes, layout.max_context, layout.commit_slots

    def shape(make):
        if len(sizes) == 1:
            return make(sizes[0])
        return ct.EnumeratedShapes(shapes=[make(t) for t in sizes], default=make(sizes[-1]))

    name = interface.input_name
    inputs = [
        ct.TensorType(name("input_ids"), shape=shape(lambda t: (1, t)), dtype=np.int32),
        ct.TensorType(name("position_ids"), shape=shape(lambda t: (1, t)), dtype=np.int32),
        ct.TensorType(name("attention_mask"), shape=shape(lambda t: (1, 1, t, c)), dtype=np.float16),
        ct.TensorType(name("write_start"), shape=(1,), dtype=np.int32),
        ct.TensorType(name("commit_src"), shape=(k,), dtype=np.int32),
        ct.TensorType(name("commit_dst"), shape=(k,), dtype=np.int32),
    ]
    outputs = [ct.TensorType(interface.output_name(r), dtype=np.float16)
               for r in ("main_logits", "stream_logits")]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16),
                           name=interface.state_name(r)) for r in ("key_cache", "value_cache")]
    with quiet():
        return ct.convert(
            traced, inputs=inputs, outputs=outputs, states=states, convert_to="mlprogram",
            minimum_deployment_target=ct.target.macOS15, compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )


def quantize_weights(mlmodel, kind: str):
    """int8 per output channel, or int4 in blocks of ``INT4_BLOCK`` (iOS 18 ops)."""
    if kind == "none":
        return mlmodel
    require_coremltools()
    from coremltools.optimize import coreml as cto

    if kind == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                         granularity="per_block", block_size=INT4_BLOCK)
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                         granularity="per_channel")
    with quiet():
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def _describe(mlmodel, meta: Dict[str, str], source: str) -> None:
    spec = interface.interface()
    mlmodel.author = "specstream-mlx"
    mlmodel.short_description = (
        f"Speculative Streaming step (gamma={meta[interface.meta_key('gamma')]}) exported from {source}")
    for group in ("inputs", "outputs"):
        described = mlmodel.input_description if group == "inputs" else mlmodel.output_description
        for entry in spec[group].values():
            described[entry["name"]] = entry["doc"][:200]
    mlmodel.user_defined_metadata.update(meta)


def _publish(mlmodel, out: Path, overwrite: bool, expected: dict) -> None:
    """Save into a temporary sibling, check the saved spec, then rename to ``out``."""
    from .package import check

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staged = tmp / out.name
        mlmodel.save(str(staged))
        _open_permissions(staged)
        problems = check(staged, expected)
        if problems:
            raise CoreMLExportError(f"the saved package is not what was asked: {problems[0]}")
        old = tmp / "old"
        if out.exists():
            os.replace(out, old)  # --overwrite: the old package goes when the new one is in place
        try:
            os.replace(staged, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_permissions(root: Path) -> None:
    """coremltools writes private files; give the package the permissions of the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _guess_tokenizer(model_path: Path, source: Optional[str]) -> str:
    from ..convert.default_model import HUB_REPO

    if source is None:
        return HUB_REPO
    if not Path(source).expanduser().exists():
        return source  # a hub repo id
    return str(model_path.resolve())


def export_coreml(model: Optional[str], out, options: ExportOptions = ExportOptions(),
                  say=lambda message: None) -> Path:
    """Export an MLX Speculative Streaming checkpoint as a Core ML package.

    Args:
        model: checkpoint folder or hub repo id (``None``: the embedded default model).
        out: ``NAME.mlpackage`` to write (nothing is left there on failure).
        options: ``ExportOptions``.
        say: progress callback (one line per stage).

    Returns:
        The path of the package.

    Raises:
        CoreMLExportError: missing coremltools/torch, unsupported model, bad
            options, a failed numerical check or a package that does not read back.
        CheckpointError: the checkpoint cannot be loaded.
    """
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise CoreMLExportError(f"--out must end in .mlpackage, got {out.name!r}")
    if out.exists() and not options.overwrite:
        raise CoreMLExportError(f"{out} already exists; choose another --out or pass --overwrite")
    sizes, quantize, compute_units = parse_options(options)
    require_torch()
    require_coremltools()
    import mlx.core as mx

    from ..loading import load, resolve_path

    if model is None:
        from ..convert.default_model import default_model_path

        path = default_model_path()
    else:
        path = resolve_path(model)
    say(f"loading {path}")
    ss_model, tokenizer = load(str(path), dtype=mx.float32)
    check_supported(ss_model, options.max_context)
    layout = layout_for(ss_model, sizes, options.max_context,
                        sorted(getattr(tokenizer, "eos_token_ids", None) or []))
    step = build_step(ss_model, options.max_context)
    say(f"tracing (sizes {', '.join(map(str, sizes))}, {options.max_context} cache slots)")
    traced = trace_step(step, layout)
    if options.check:
        from .parity import compare, worst

        errors = compare(TorchBackend(traced), ss_model, layout)
        say(f"traced module vs MLX: largest difference {worst(errors):.2e} of the logit scale")
        if worst(errors) > CHECK_TOLERANCE:
            raise CoreMLExportError(
                f"the traced module does not match the MLX runtime (differences {errors}); "
                f"please report this model")
        TorchBackend(traced).reset()
    say("converting to an ML Program (macOS 15 / iOS 18, float16)")
    mlmodel = convert_traced(traced, layout, tuple(step.keys.shape))
    if quantize != "none":
        say(f"quantizing weights to {quantize}")
        mlmodel = quantize_weights(mlmodel, quantize)
    meta = metadata(ss_model, layout, quantize, compute_units,
                    options.tokenizer or _guess_tokenizer(path, model))
    _describe(mlmodel, meta, path.name)
    expected = {"layout": layout, "cache_shape": tuple(step.keys.shape), "metadata": meta,
                "quantize": quantize, "vocab_size": layout.vocab_size}
    say(f"saving {out}")
    _publish(mlmodel, out, options.overwrite, expected)
    return out
