"""Launch the fused tree-attention kernel through ``mx.fast.metal_kernel`` or
``mx.fast.cuda_kernel``.

``make_plan`` turns one attention call into the kernel's inputs, template
constants and grid; ``tree_attention`` runs it on the backend at hand. The
CPU emulator (``emulator``) consumes the very same plans.

Threadgroup size: ``NSIMD * 32`` threads. Metal GPUs differ in how many
threads a threadgroup may hold, and the limit is per compiled kernel
(``maxTotalThreadsPerThreadgroup``), so it is queried, never assumed: a
device-info key if MLX reports one, else a one-off probe launch whose error
(MLX names the limit) fixes the size (``threadgroup_limit``).

Variants. Each template instantiation (dtype, head dim, SIMD groups, slots) is
compiled by MLX when its first launch is *evaluated*, i.e. at the caller's
``mx.eval``, outside any ``try`` around the launch. So before a variant's
first use ``tree_attention`` compiles and runs it once, eagerly, on a 1-row
problem (``check_variant``); the outcome is remembered per variant, and a
variant that failed raises ``KernelUnavailable`` (naming it) on every later
call, at once, so the caller can take its reference path for that variant.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .sources import INPUT_NAMES, OUTPUT_NAMES, kernel_header, kernel_source

HEAD_DIMS = (64, 96, 128, 256)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_ROWS = 256  # query rows per call handled by the fused kernel
MAX_SIMD_GROUPS = 8  # preferred upper bound on SIMD groups per threadgroup
KERNEL_NAME = "ss_tree_attention"
LIMIT_ENV = "SPECSTREAM_MAX_THREADGROUP"  # optional manual cap (threads)

# MLX reports the per-kernel limit in this message when a launch exceeds it.
_LIMIT_MESSAGE = re.compile(r"maximum allowed threads per threadgroup \((\d+)\)")
_DEVICE_INFO_KEYS = ("max_threads_per_threadgroup", "max_threadgroup_size")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one kernel launch needs.

    Attributes:
        inputs: arrays in ``INPUT_NAMES`` order.
        template: ``(name, value)`` pairs for ``T, HEAD_DIM, NSIMD, SPS``.
        grid: threads per axis, ``(blocks * NSIMD * 32, Hkv, 1)``.
        threadgroup: ``(NSIMD * 32, 1, 1)``.
        output_shape: ``(1, Hq, L, D)``.
        output_dtype: the queries' dtype.
    """

    inputs: tuple
    template: tuple
    grid: tuple
    threadgroup: tuple
    output_shape: tuple
    output_dtype: mx.Dtype

    @property
    def simd_groups(self) -> int:
        return dict(self.template)["NSIMD"]

    @property
    def slots(self) -> int:
        return dict(self.template)["SPS"]


def slots_per_group(head_dim: int) -> int:
    """Query slots served by one threadgroup (register budget: SPS * D / 32 floats)."""
    return 4 if head_dim <= 128 else 2


def simd_groups_for(n_keys: int, max_threads: int) -> int:
    """SIMD groups per threadgroup: a power of two, each with >= 2 key tiles."""
    cap = max(1, min(MAX_SIMD_GROUPS, max_threads // 32))
    n = 1
    while n * 2 <= cap and n * 2 * 2 * 32 <= n_keys:
        n *= 2
    return n


def check_shapes(q: mx.array, k: mx.array, v: mx.array, table: mx.array, n_keys: int) -> None:
    """Raise ``ValueError`` if the fused kernel cannot take these arrays."""
    if q.ndim != 4 or q.shape[0] != 1:
        raise ValueError(f"queries must be (1, Hq, L, D), got {q.shape}")
    _, heads, rows, dim = q.shape
    if k.ndim != 4 or k.shape[0] != 1 or k.shape[3] != dim or v.shape != k.shape:
        raise ValueError(f"keys/values must be (1, Hkv, cap, {dim}), got {k.shape} / {v.shape}")
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads do not split over {k.shape[1]} kv heads")
    if dim not in HEAD_DIMS:
        raise ValueError(f"head dim {dim} has no fused kernel (supported: {HEAD_DIMS})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {DTYPES} for all")
    if n_keys > k.shape[2]:
        raise ValueError(f"{n_keys} keys needed, buffers hold {k.shape[2]}")
    if table.ndim != 2 or table.shape[0] != rows or table.dtype != mx.uint32:
        raise ValueError(f"row table must be uint32 ({rows}, 3 + W), got {table.dtype} {table.shape}")
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} query rows: the fused kernel takes at most {MAX_ROWS}")


def make_plan(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    table: mx.array,
    offset: int,
    n_main: int,
    window: Optional[int],
    scale: float,
    max_threads: int = 1024,
    simd_groups: Optional[int] = None,
    slots: Optional[int] = None,
) -> LaunchPlan:
    """Inputs, template constants and grid of one fused attention call.

    Args:
        q: ``(1, Hq, L, D)`` queries.
        k, v: ``(1, Hkv, cap, D)`` key/value buffers; rows ``[0, offset + L)``
            hold the cached prefix then the ``L`` new rows.
        table: ``(L, 3 + W)`` uint32 row table (``treedesc.TreeDesc.table``).
        offset: cached prefix length.
        n_main: rows covered by the ancestor bitmask (``TreeDesc.n_main``).
        window: sliding window of the layer, or ``None``.
        scale: softmax scale.
        max_threads: threadgroup limit of the device (see ``threadgroup_limit``).
        simd_groups, slots: override the launch shape (tests, benchmarks).
    """
    rows = q.shape[2]
    n_keys = offset + rows
    check_shapes(q, k, v, table, n_keys)
    words = table.shape[1] - 3
    if words * 32 < n_main:
        raise ValueError(f"{words} bitmask words cannot cover {n_main} main rows")
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
    group = heads // kv_heads
    nsimd = simd_groups or simd_groups_for(n_keys, max_threads)
    sps = slots or slots_per_group(dim)
    if nsimd * 32 > max_threads:
        raise ValueError(f"{nsimd} SIMD groups exceed the threadgroup limit of {max_threads} threads")
    params = mx.array(
        [offset, rows, k.shape[2], int(window or 0), table.shape[1], n_main, group], dtype=mx.int32
    )
    blocks = math.ceil(rows * group / sps)
    return LaunchPlan(
        inputs=(q, k, v, table, params, mx.array([scale], dtype=mx.float32)),
        template=(("T", q.dtype), ("HEAD_DIM", dim), ("NSIMD", nsimd), ("SPS", sps)),
        grid=(blocks * nsimd * 32, kv_heads, 1),
        threadgroup=(nsimd * 32, 1, 1),
        output_shape=(1, heads, rows, dim),
        output_dtype=q.dtype,
    )


class KernelUnavailable(RuntimeError):
    """A kernel variant that failed to compile or run on this device (remembered).

    Attributes:
        variant: ``(flavour, dtype, head dim, SIMD groups, slots)``; SIMD groups
            is ``None`` when no SIMD-group count works for the other three.
        why: the error the build or launch raised.
    """

    def __init__(self, variant: tuple, why: str) -> None:
        super().__init__(f"{describe_variant(variant)}: {why}")
        self.variant = variant
        self.why = why


def describe_variant(variant: tuple) -> str:
    """``variant`` (as in ``KernelUnavailable``) in words."""
    flavour, dtype, dim, nsimd, sps = variant
    groups = "any SIMD-group count" if nsimd is None else f"{nsimd} SIMD group(s)"
    return f"{flavour} kernel {dtype}, head dim {dim}, {groups}, {sps} slots"


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _variant(flavour: str, dtype, dim: int, nsimd: Optional[int], sps: int) -> tuple:
    return (flavour, _dtype_name(dtype), dim, nsimd, sps)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def backend() -> Optional[str]:
    """``"metal"`` or ``"cuda"`` when the default device is a GPU that has the kernel."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


_kernels: dict = {}
_limits: dict = {}  # (flavour, dtype, head dim, slots) -> threads, or the KernelUnavailable
_variants: dict = {}  # variant -> None (compiled and ran) or why it failed
_lock = threading.Lock()


def _kernel(flavour: str):
    with _lock:
        if flavour not in _kernels:
            make = mx.fast.metal_kernel if flavour == "metal" else mx.fast.cuda_kernel
            _kernels[flavour] = make(
                name=KERNEL_NAME,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                source=kernel_source(flavour),
                header=kernel_header(flavour),
            )
        return _kernels[flavour]


def run_plan(plan: LaunchPlan, flavour: str) -> mx.array:
    """Launch ``plan`` on the GPU (lazily, like any MLX op)."""
    (out,) = _kernel(flavour)(
        inputs=list(plan.inputs),
        template=list(plan.template),
        grid=plan.grid,
        threadgroup=plan.threadgroup,
        output_shapes=[plan.output_shape],
        output_dtypes=[plan.output_dtype],
    )
    return out


def limit_from_error(message: str) -> Optional[int]:
    """The threadgroup limit named in an MLX launch error, if any."""
    found = _LIMIT_MESSAGE.search(message)
    return int(found.group(1)) if found else None


def _probe(flavour: str, dtype, dim: int, nsimd: int, sps: int) -> None:
    """Run the kernel once on a 1-row problem (raises what the launch raises)."""
    q = mx.zeros((1, 1, 1, dim), dtype=dtype)
    k = mx.zeros((1, 1, 1, dim), dtype=dtype)
    table = mx.array([[0, 0, 0, 1]], dtype=mx.uint32)
    plan = make_plan(q, k, k, table, 0, 1, None, 1.0, nsimd * 32, nsimd, sps)
    mx.eval(run_plan(plan, flavour))


def threadgroup_limit(
    flavour: str,
    dtype,
    dim: int,
    sps: int,
    probe: Callable[[str, object, int, int, int], None] = _probe,
) -> int:
    """Threads per threadgroup the kernel may use on this device (cached).

    Order: ``SPECSTREAM_MAX_THREADGROUP`` if set; a device-info key if MLX
    reports one; else probe launches from ``MAX_SIMD_GROUPS * 32`` threads
    down, reading the limit out of MLX's error when a launch exceeds it. A
    probe that fails otherwise (a build error, too much threadgroup memory)
    marks its variant failed and the next smaller SIMD-group count is tried.

    Raises:
        KernelUnavailable: no SIMD-group count works (remembered too).
    """
    key = (flavour, _dtype_name(dtype), dim, sps)
    if key in _limits:
        if isinstance(_limits[key], KernelUnavailable):
            raise _limits[key]
        return _limits[key]
    cap = MAX_SIMD_GROUPS * 32
    env = os.environ.get(LIMIT_ENV)
    if env:
        try:
            cap = min(cap, int(env))
        except ValueError:
            raise ValueError(f"{LIMIT_ENV} must be a thread count like 256, got {env!r}")
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for name in _DEVICE_INFO_KEYS:
        if name in info:
            cap = min(cap, int(info[name]))
    limit, errors = None, []
    while cap >= 32:
        nsimd = 1 << int(math.log2(cap // 32))
        try:
            probe(flavour, dtype, dim, nsimd, sps)
        except Exception as exc:  # MLX raises ValueError/RuntimeError by backend
            named = limit_from_error(str(exc))
            if named is not None and named < nsimd * 32:
                cap = named
                continue
            # Any other failure (a build error, too much threadgroup memory):
            # this variant is out; fewer SIMD groups may still work.
            _variants[_variant(flavour, dtype, dim, nsimd, sps)] = _why(exc)
            errors.append(_why(exc))
            cap = nsimd * 32 // 2
            continue
        _variants[_variant(flavour, dtype, dim, nsimd, sps)] = None
        limit = nsimd * 32
        break
    if limit is None:
        failure = KernelUnavailable(
            _variant(flavour, dtype, dim, None, sps),
            errors[0] if errors else "cannot run with even 32 threads per threadgroup "
                                     "(set SPECSTREAM_ATTENTION=reference)",
        )
        _limits[key] = failure
        raise failure
    _limits[key] = limit
    return limit


def check_variant(flavour: str, dtype, dim: int, nsimd: int, sps: int,
                  probe: Callable[[str, object, int, int, int], None] = _probe) -> None:
    """Compile and run one variant eagerly before its first use (the outcome is cached).

    Raises:
        KernelUnavailable: the variant failed to build or run, now or earlier.
    """
    variant = _variant(flavour, dtype, dim, nsimd, sps)
    if variant not in _variants:
        try:
            probe(flavour, dtype, dim, nsimd, sps)
        except Exception as exc:  # a build error surfaces at the probe's mx.eval
            _variants[variant] = _why(exc)
        else:
            _variants[variant] = None
    if _variants[variant] is not None:
        raise KernelUnavailable(variant, _variants[variant])


def prepare(dtype, head_dim: int) -> Optional[int]:
    """Query the threadgroup limit and compile every variant ahead of time.

    The first fused call per variant does this eagerly (it evaluates a tiny
    launch); call ``prepare`` before tracing a step with ``mx.compile``. Every
    SIMD-group count within the limit is compiled and run once; failures are
    remembered (``tree_attention`` then raises ``KernelUnavailable`` for them).
    Returns the limit in threads, or ``None`` without a fused backend.

    Raises:
        KernelUnavailable: no variant of this dtype and head dim works.
    """
    flavour = backend()
    if flavour is None:
        return None
    sps = slots_per_group(head_dim)
    limit = threadgroup_limit(flavour, dtype, head_dim, sps)
    nsimd = 1
    while nsimd <= min(MAX_SIMD_GROUPS, limit // 32):
        try:
            check_variant(flavour, dtype, head_dim, nsimd, sps)
        except KernelUnavailable:
            pass  # remembered: calls that would use it raise at once
        nsimd *= 2
    return limit


def tree_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    table: mx.array,
    offset: int,
    n_main: int,
    window: Optional[int],
    scale: float,
) -> mx.array:
    """Fused tree attention on the current GPU backend.

    Same arguments as ``make_plan``. Returns ``(1, Hq, L, D)``.

    Raises:
        RuntimeError: no fused kernel on this backend.
        KernelUnavailable: the variant this call needs failed to build or run
            (checked eagerly before its first use, then remembered).
    """
    flavour = backend()
    if flavour is None:
        raise RuntimeError("no fused tree-attention kernel on this device: use the reference path")
    dim, sps = q.shape[3], slots_per_group(q.shape[3])
    limit = threadgroup_limit(flavour, q.dtype, dim, sps)
    plan = make_plan(q, k, v, table, offset, n_main, window, scale, max_threads=limit)
    check_variant(flavour, q.dtype, dim, plan.simd_groups, plan.slots)
    return run_plan(plan, flavour)
