"""Load an optimised BLAS before MLX on Linux CPUs.

The ``mlx[cpu]`` wheel for Linux links a reference BLAS (a few GFLOP/s for a
float32 matmul). When an OpenBLAS shared library is installed, loading it with
``RTLD_GLOBAL`` *before* ``mlx.core`` is imported makes MLX's ``cblas_sgemm``
calls resolve to OpenBLAS (30-60x faster here). This module must be imported
before anything imports ``mlx``; ``specstream_mlx/__init__.py`` does that.

Set ``SPECSTREAM_BLAS=none`` to skip it, or ``SPECSTREAM_BLAS=/path/lib.so`` to
choose the library.

OpenBLAS picks its kernels from the CPU model it detects. Releases older
than the CPU (Debian 12's 0.3.21 on a 2023 Xeon, measured 2026-12-07) do not
know the model and fall back to the generic "Prescott" (SSE3) kernels: 32-45
GFLOP/s instead of 160-250 on the same 2 cores. So, unless
``OPENBLAS_CORETYPE`` is already set, ``preload`` sets it from the CPU's
flags (``coretype_for``) before the library loads: ``SkylakeX`` where
AVX-512 is complete, ``Haswell`` where AVX2 and FMA are. Either kernel runs
on any CPU with those flags, and a current OpenBLAS would choose it (or a
newer relative of it) itself.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

#: Path of the BLAS library loaded by this module, or ``None``.
LOADED: str | None = None
#: Why no library was loaded (for ``--verbose`` output).
REASON: str = "not attempted"


def _find() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    # pip's scipy-openblas wheels, when installed.
    for pattern in ("scipy_openblas64", "scipy_openblas32"):
        for mod_dir in sys.path:
            hits = glob.glob(os.path.join(mod_dir, pattern, "lib", "libscipy_openblas*.so"))
            if hits:
                return hits[0]
    return None


#: Instruction-set flags each OpenBLAS kernel family needs, best first.
_CORETYPES = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2"}),
    ("Haswell", {"avx2", "fma"}),
)

#: The ``OPENBLAS_CORETYPE`` this module set, or ``None`` (not set by us).
CORETYPE: str | None = None


def coretype_for(flags: set) -> str | None:
    """The OpenBLAS kernel family for a CPU with these ``/proc/cpuinfo`` flags (``None``: leave
    OpenBLAS's own choice)."""
    for name, needed in _CORETYPES:
        if needed <= flags:
            return name
    return None


def cpuinfo(field: str) -> str | None:
    """The first ``field`` line of ``/proc/cpuinfo`` (``"flags"``, ``"model name"``), or ``None``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def preload() -> str | None:
    """Load OpenBLAS globally if this is Linux and one is installed.

    Returns:
        The path loaded, or ``None`` (see ``REASON``).
    """
    global LOADED, REASON, CORETYPE
    if LOADED is not None:
        return LOADED
    choice = os.environ.get("SPECSTREAM_BLAS", "auto")
    if choice == "none":
        REASON = "disabled by SPECSTREAM_BLAS=none"
        return None
    if platform.system() != "Linux":
        REASON = "not Linux (MLX uses Accelerate on macOS)"
        return None
    if "mlx.core" in sys.modules:
        REASON = "mlx was imported before specstream_mlx; import specstream_mlx first"
        return None
    path = choice if choice != "auto" else _find()
    if path is None:
        REASON = "no OpenBLAS found (apt-get install libopenblas0-pthread)"
        return None
    if "OPENBLAS_CORETYPE" not in os.environ and platform.machine() in ("x86_64", "AMD64"):
        CORETYPE = coretype_for(set((cpuinfo("flags") or "").split()))
        if CORETYPE is not None:  # read when the library loads, so set it first
            os.environ["OPENBLAS_CORETYPE"] = CORETYPE
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        REASON = f"could not load {path}: {exc}"
        return None
    LOADED, REASON = path, "loaded"
    return path


def describe() -> str:
    """One line for ``--verbose`` output saying which BLAS MLX uses."""
    if LOADED:
        kernels = os.environ.get("OPENBLAS_CORETYPE")
        chosen = "" if kernels is None else f", {kernels} kernels" + (" (from the CPU's flags)" if CORETYPE else "")
        return f"BLAS: {LOADED} (preloaded before mlx{chosen})"
    return f"BLAS: MLX default ({REASON})"
