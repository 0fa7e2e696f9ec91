"""Read the kernel sources shipped in this package and assemble them for MLX.

``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` take a ``header`` (code put
before the generated signature) and a ``source`` (the function body). MLX's
JIT has no include path for package files, so an ``#include "x.inc"`` line in
a body file is replaced here by the text of ``x.inc`` (one level, ``.inc``
files only). The CPU emulator compiles exactly these strings.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

FLAVOURS = ("metal", "cuda")
INPUT_NAMES = ("q", "k", "v", "rows", "params", "scale")
OUTPUT_NAMES = ("out",)
TEMPLATE_NAMES = ("T", "HEAD_DIM", "NSIMD", "SPS")

_FILES = {
    "metal": ("metal_prelude.h", "tree_attention.metal"),
    "cuda": ("cuda_prelude.cuh", "tree_attention.cu"),
}
_INCLUDE = re.compile(r'^[ \t]*#include "([A-Za-z0-9_]+\.inc)"[ \t]*$', re.MULTILINE)


def read_text(name: str) -> str:
    """Text of a file shipped in ``specstream_mlx.kernels_metal``."""
    path = resources.files(__package__).joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"kernel source {name!r} is missing from the installed package: "
            "reinstall specstream-mlx (its wheel ships kernels_metal/*)"
        )
    return path.read_text(encoding="utf-8")


def splice(text: str) -> str:
    """Replace ``#include "name.inc"`` lines by the text of ``name.inc``."""
    return _INCLUDE.sub(lambda m: read_text(m.group(1)).rstrip("\n"), text)


def _check(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown kernel flavour {flavour!r}: use one of {FLAVOURS}")


@functools.lru_cache(maxsize=None)
def kernel_header(flavour: str) -> str:
    """The ``header`` string for the ``flavour`` ("metal" or "cuda") kernel."""
    _check(flavour)
    return read_text(_FILES[flavour][0])


@functools.lru_cache(maxsize=None)
def kernel_source(flavour: str) -> str:
    """The ``source`` (function body) string for the ``flavour`` kernel."""
    _check(flavour)
    return splice(read_text(_FILES[flavour][1]))
