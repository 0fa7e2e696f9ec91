"""The ``specstream-mlx`` typer app and what every command shares: error translation, option parsing."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .. import _blas  # noqa: F401  (loads OpenBLAS before mlx)
from ..config import TreeSettings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Speculative Streaming decoding on MLX: one model drafts its own future tokens.",
)


class UsageError(ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""


#: How the library names a setting at the start of its error messages, and the
#: option that sets it. The library validates every value (once, where it first
#: receives it); the command line only says which of its options was wrong.
LIBRARY_NAMES = {
    "max_tokens": "--max-tokens",
    "shard": "--shard",
    "num_heads": "--num-heads",
    "kind": "--kind",
    "source": "--drafts",
    "temperature": "--temp",
    "top-p": "--top-p",
    "top-k": "--top-k",
    "max_nodes": "--max-nodes",
    "tree widths": "--tree-width",
    "lookup": "--lookup",
    "num_prompts": "--num-prompts",
    "num_draft_tokens": "--num-draft-tokens",
    "pld_max_ngram": "--pld-ngram",
    "pld_tokens": "--pld-tokens",
    "warmup_tokens": "--warmup-tokens",
    "iters": "--iters",
    "batch_size": "--batch-size",
    "max_seq_len": "--max-seq-len",
    "save_every": "--save-every",
    "positions": "--positions",
    "learning_rate": "--learning-rate",
    "embedding_lr": "--embedding-lr",
    "schedule": "--schedule",
    "metric": "--metric",
}

#: Tree widths as options and messages spell them, e.g. ``3,2,1``.
DEFAULT_WIDTHS = ",".join(map(str, TreeSettings().widths))


def _option_message(exc: Exception, ctx: Optional[typer.Context]):
    """``(message, named)``: the error's text with the running command's option for the
    setting it is about (``max_tokens must ...`` -> ``--max-tokens must ...``); ``named``
    if it is about one of them. A leading library name (``LIBRARY_NAMES``) is replaced;
    else an error's ``field`` attribute (``verify.SamplingError``) naming a parameter of
    the command puts its option in front."""
    message = str(exc)
    params = [p for p in ctx.command.params if getattr(p, "opts", None)] if ctx else []
    flags = {opt for param in params for opt in param.opts}
    for name, flag in LIBRARY_NAMES.items():
        if message.startswith(name + " ") and flag in flags:
            return flag + message[len(name):], True
    field = getattr(exc, "field", None)
    for param in params:
        if param.name == field:
            return f"{max(param.opts, key=len)}: {message}", True
    return message, False


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn, ctx: Optional[typer.Context] = None):
    """Call ``fn`` turning the library's input errors into one-line messages.

    Exit code 2 for bad options (``UsageError``, or a library error about one
    of the options of ``ctx``'s command), 1 for everything else.
    """
    from ..config import CheckpointError
    from ..decode import ContextOverflowError
    from ..families import UnsupportedArchitectureError

    try:
        return fn()
    except (CheckpointError, UnsupportedArchitectureError, ContextOverflowError) as exc:
        _fail(str(exc))
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        message, named = _option_message(exc, ctx)
        _fail(message, 2 if named or isinstance(exc, UsageError) else 1)


def _parse_widths(text: Optional[str]) -> Optional[tuple]:
    """``--tree-width`` text as a tuple of integers (``TreeSettings`` checks the values)."""
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        widths = ()
    if not widths:
        raise UsageError(f"--tree-width takes comma-separated integers like {DEFAULT_WIDTHS}, got {text!r}")
    return widths


def model_or_default(model: Optional[str]) -> str:
    """``--model`` as a folder or hub id; the embedded model (``smollm2-135m``, converted
    into the cache on first use) when it is that name or not given."""
    from ..convert.default_model import MODEL_NAME, named_model

    return str(named_model(model or MODEL_NAME) or model)


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
