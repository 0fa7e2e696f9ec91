"""Core ML export of a Speculative Streaming model (``specstream-mlx export-coreml``).

* ``interface``: the calling convention of an exported package (``interface.json``,
  read by the exporter and by the Swift package in ``apps/SpecStreamCoreML``);
* ``step``: the PyTorch module that is traced and converted (one decode step:
  commit, write, multi-stream forward over the cached state);
* ``host``: the host side of the loop in Python (inputs of each call, drafting,
  verification, commit), run against the traced module or, on macOS, the package;
* ``export``: tracing, numerical check against MLX, conversion, quantisation,
  metadata and the atomic save; ``package``: reading a saved package's spec back.

coremltools and torch are imported lazily (``pip install "specstream-mlx[coreml]"``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from contextlib import contextmanager

from ..config import CheckpointError

INSTALL_HINT = 'pip install "specstream-mlx[coreml]"'


class CoreMLExportError(CheckpointError):
    """The export cannot be done as asked (unsupported model, bad option, missing package)."""


def require_coremltools():
    """``coremltools`` (logging errors only), or a ``CoreMLExportError`` that says
    how to install it."""
    import logging

    # On Linux coremltools logs that its prediction library is missing; the
    # exporter reports its own stages.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools
    except ImportError:
        raise CoreMLExportError(
            f"Core ML export needs coremltools, which is not installed; {INSTALL_HINT}"
        ) from None
    return coremltools


def require_torch():
    """``torch``, or a ``CoreMLExportError`` that says how to install it."""
    try:
        import torch
    except ImportError:
        raise CoreMLExportError(
            f"Core ML export needs PyTorch, which is not installed; {INSTALL_HINT}"
        ) from None
    return torch


@contextmanager
def quiet():
    """Silence coremltools' progress bars and warnings (stderr) while converting."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
