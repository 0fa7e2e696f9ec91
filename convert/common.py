"""Shared pieces of the converters: the error type, progress output, atomic output."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..atomic import atomic_dir
from ..config import CheckpointError

DTYPES = ("float16", "bfloat16", "float32")


class ConversionError(CheckpointError):
    """The input of a conversion is missing, corrupt, unsupported or inconsistent."""


def package_data() -> Path:
    """``specstream_mlx/data``: the trained streams and task models the package ships."""
    import specstream_mlx  # the data sits in the package itself (convert/ is mapped elsewhere)

    return Path(specstream_mlx.__file__).resolve().parent / "data"


def say(message: str, quiet: bool = False) -> None:
    """One progress line on stderr (stdout stays free for the caller's output)."""
    if not quiet:
        print(f"[convert] {message}", file=sys.stderr, flush=True)


@contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` that becomes ``out`` on success.

    On any error the temporary folder is removed and ``out`` is left as it was.

    Raises:
        ConversionError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(
            f"{out} already exists; choose another --mlx-path or pass --overwrite to replace it"
        )
    with atomic_dir(out) as tmp:
        yield tmp


def parse_dtype(name: Optional[str]):
    """The ``mx.Dtype`` for ``--dtype`` (``None`` keeps the source's)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    import mlx.core as mx

    return getattr(mx, name)
