"""What a benchmark ran on: environment, backend, memory bandwidth, speed bound.

Decoding one token reads every weight once, so on a bandwidth-bound machine
``tokens/s <= bandwidth / bytes of weights``. ``measure_bandwidth`` copies a
large array: with MLX on a GPU (what decoding uses there); with numpy on the
CPU, because MLX's CPU element-wise kernels are single-threaded and
compute-bound (about 2 GB/s here), which would understate the memory system.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import _blas
from ..config import backend


def _version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # not installed under that name
        return None


def environment(dtype: Optional[str] = None) -> dict:
    """Software and machine facts to record next to the results."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "specstream_mlx": _version("specstream-mlx"),
        "numpy": np.__version__,
        "backend": backend(),
        "dtype": dtype,
        "blas": _blas.describe(),
        "cpu": cpu_model(),
    }
    threads = {k: os.environ[k] for k in
               ("SPECSTREAM_BLAS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MLX_DISABLE_COMPILE")
               if k in os.environ}
    if threads:
        env["env_vars"] = threads
    return env


def weight_bytes(model) -> int:
    """Bytes of every array in ``model`` (quantized weights count as stored)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """Memory bandwidth from a large copy (1 read + 1 write), best of ``repeats``.

    Returns:
        ``{"gbps", "method", "megabytes"}``.
    """
    count = megabytes * (1 << 20) // 4
    best = float("inf")
    if backend() == "cpu":
        src = np.ones(count, dtype=np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # fault the pages in
        for _ in range(repeats):
            tic = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - tic)
        method = "numpy copy (CPU)"
    else:
        src = mx.ones((count,), dtype=mx.float32)
        mx.eval(src)
        mx.eval(src + 1)
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(src + 1)
            best = min(best, time.perf_counter() - tic)
        method = f"mlx copy ({backend()})"
        del src
    return {"gbps": 2 * count * 4 / best / 1e9, "method": method, "megabytes": megabytes}


def measure_elementwise(count: int = 1 << 22, repeats: int = 5) -> dict:
    """Nanoseconds per element of ``mx.exp`` and of an add on this backend, best of ``repeats``.

    Softmax (attention) and SiLU cost one ``exp`` per element: on a backend where
    ``exp`` is many times an add, every extra tree row costs more than its
    matmuls. (mlx's Linux CPU wheel: about 20 ns per ``exp``, 0.5 per add.)

    Returns:
        ``{"exp_ns", "add_ns", "elements"}``.
    """
    x = mx.random.normal((count,), key=mx.random.key(0))
    mx.eval(x)
    figures = {}
    for name, op in (("exp_ns", mx.exp), ("add_ns", lambda a: a + 1.0)):
        mx.eval(op(x))
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(op(x))
            best = min(best, time.perf_counter() - tic)
        figures[name] = best / count * 1e9
    figures["elements"] = count
    return figures


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    return _blas.cpuinfo("model name") or platform.processor() or None


def device_report(base_model, dtype: str) -> dict:
    """Backend, dtype, BLAS, mlx version, bandwidth and the speed upper bound.

    Args:
        base_model: the mlx-lm model whose weights decoding reads per token.
        dtype: its floating dtype, as text.
    """
    bandwidth = measure_bandwidth()
    elementwise = measure_elementwise()
    size = weight_bytes(base_model)
    return {
        "backend": backend(),
        "dtype": dtype,
        "blas": _blas.describe(),
        "cpu": cpu_model(),
        "mlx": mx.__version__,
        "bandwidth_gbps": bandwidth["gbps"],
        "bandwidth_method": bandwidth["method"],
        "weight_bytes": size,
        "upper_bound_tps": bandwidth["gbps"] * 1e9 / size,
        "exp_ns": elementwise["exp_ns"],
        "add_ns": elementwise["add_ns"],
    }


def format_device_report(report: dict, ar_tps: Optional[float]) -> str:
    """The ``--device-report`` section as text."""
    lines = [
        "## Device",
        f"- backend: {report['backend']}, dtype: {report['dtype']}, mlx {report['mlx']}",
        f"- {report['blas']}" + (f" on {report['cpu']}" if report.get("cpu") else ""),
        f"- memory bandwidth: {report['bandwidth_gbps']:.1f} GB/s ({report['bandwidth_method']})",
        f"- weights: {report['weight_bytes'] / 1e6:.1f} MB -> upper bound "
        f"{report['upper_bound_tps']:.1f} tokens/s (bandwidth / bytes of weights)",
    ]
    if report.get("exp_ns") is not None:  # reports written before it have none
        lines.append(f"- elementwise: exp {report['exp_ns']:.2f} ns, add {report['add_ns']:.2f} ns "
                     f"per element (softmax and SiLU pay one exp per element)")
    if ar_tps is not None:
        share = ar_tps / report["upper_bound_tps"]
        lines.append(f"- measured ar: {ar_tps:.1f} tokens/s ({share:.0%} of the bound)")
    return "\n".join(lines)
