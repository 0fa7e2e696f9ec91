"""The ``specstream-mlx`` command line. Commands parse options and call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .. import _blas  # noqa: F401  (loads OpenBLAS before mlx)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Speculative Streaming decoding on MLX: one model drafts its own future tokens.",
)


class UsageError(ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn):
    """Call ``fn`` turning the library's input errors into one-line messages."""
    from ..config import CheckpointError
    from ..decode import ContextOverflowError
    from ..families import UnsupportedArchitectureError

    try:
        return fn()
    except UsageError as exc:
        _fail(str(exc), 2)
    except (CheckpointError, UnsupportedArchitectureError, ContextOverflowError) as exc:
        _fail(str(exc))
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        _fail(str(exc))


def _parse_widths(text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise UsageError(f"--tree-width takes comma-separated integers like 3,2,1, got {text!r}")
    if not widths or any(w < 1 for w in widths):
        raise UsageError(f"--tree-width needs positive widths like 3,2,1, got {text!r}")
    return widths


def check_decode_options(max_tokens: int, temp: float, max_nodes: Optional[int]) -> None:
    """Refuse decoding options that cannot work (``UsageError``)."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if temp < 0:
        raise UsageError(f"--temp must be >= 0, got {temp}")
    if max_nodes is not None and max_nodes < 1:
        raise UsageError(f"--max-nodes must be >= 1, got {max_nodes}")


def model_or_default(model: Optional[str]) -> str:
    """``--model``, or the embedded default model (converted into the cache on first use)."""
    if model is not None:
        return model
    from ..convert.default_model import default_model_path

    return str(default_model_path())


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty: pass text with -p/--prompt (or - for stdin)")
    return prompt


def _parse_ints(text: str, option: str) -> list:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers like 4,16,40, got {text!r}")
    if not values or any(x < 0 for x in values):
        raise UsageError(f"{option} needs non-negative integers like 4,16,40, got {text!r}")
    return values


def describe_runtime(model, tree=None) -> str:
    """Backend, BLAS, dtype and the tree in use, for ``--verbose``."""
    import mlx.core as mx

    from ..config import backend

    dtype = model.base.model.norm.weight.dtype
    text = (
        f"[specstream-mlx] mlx {mx.__version__}, backend {backend()}, dtype {dtype}, "
        f"{_blas.describe()}, gamma={model.config.gamma}, "
        f"stream layers={model.config.stream_layers}, mode={model.config.mode}"
    )
    if tree is not None:
        own = backend() in model.config.tree_by_backend
        text += (f", tree {','.join(map(str, tree.widths))} max nodes {tree.max_nodes or 'all'}"
                 f" (checkpoint default: {'this backend' if own else 'fallback'})")
    return text
