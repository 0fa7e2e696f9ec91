"""Attention dispatch: fused tree-attention kernel where available, reference elsewhere.

mlx-lm's attention modules call ``scaled_dot_product_attention(queries, keys,
values, cache=..., scale=..., mask=...)``, a name each model module imports
from ``mlx_lm.models.base``. ``install`` rebinds that name in the module of a
model to a dispatch function (``make_dispatch``, wrapping the module's own
function), which:

* for a ``TreeMask`` (made by the runtime's forward for tree / multi-stream
  rows) runs the fused kernel (``kernels_metal``) when the backend has one and
  the call fits it, and otherwise builds the dense mask and runs the
  reference;
* for anything else calls the module's own function unchanged, so plain
  mlx-lm use of the same model class is unaffected.

The reference is ``mx.fast.scaled_dot_product_attention`` with a boolean mask
(via mlx-lm). ``SPECSTREAM_ATTENTION`` picks the policy: ``auto`` (default),
``reference`` (never the fused kernel) or ``fused`` (every tree / multi-stream
call must take the fused kernel, and an error says why when it cannot). Plain
chains (prefill chunks without stream rows, 1-row decoding) always take the
reference, with its ``None`` / ``"causal"`` fast paths.

Failures under ``auto`` are per kernel variant: ``kernels_metal.launch``
compiles and runs each variant (dtype, head dim, SIMD groups, slots) eagerly
before its first use, so a build error is raised inside the dispatch, not at
the decode's later ``mx.eval``. The failed variant is remembered
(``failures``), one warning line names it, and its calls take the reference
from then on; the other variants keep the kernel.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import base as _mlx_base

from .masks import MaskLike, build_mask
from .treedesc import TreeDesc

ENV = "SPECSTREAM_ATTENTION"
MODES = ("auto", "reference", "fused")
_reference = _mlx_base.scaled_dot_product_attention

# A fused implementation: (q, k_buf, v_buf, table, offset, n_main, window, scale) -> out.
FusedImpl = Callable[..., mx.array]
_override: Optional[FusedImpl] = None
# Kernel variants that failed in this process (auto mode) -> why. Keys: the
# ``variant`` of a ``launch.KernelUnavailable``, else ``(dtype, head dim)`` of
# the call for an error that names no variant.
_failed: dict = {}


def mode() -> str:
    """The attention policy from ``SPECSTREAM_ATTENTION`` (default ``auto``)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not a policy: set it to one of {', '.join(MODES)}")
    return value


def fused_impl() -> Optional[FusedImpl]:
    """The fused kernel for the current device, or ``None`` (reference only)."""
    if _override is not None:
        return _override
    from .kernels_metal import launch

    return launch.tree_attention if launch.backend() is not None else None


@contextlib.contextmanager
def fused_override(impl: FusedImpl) -> Iterator[None]:
    """Use ``impl`` as the fused kernel inside the block (tests: the CPU emulator)."""
    global _override
    previous, _override = _override, impl
    try:
        yield
    finally:
        _override = previous


class TreeMask:
    """The mask of one layer group, kept lazy: compact for the kernel, dense on demand.

    Attributes:
        offset: committed cache length (keys before the new rows).
        window: sliding window of the layers in the group, or ``None``.
    """

    def __init__(self, block, offset, positions, window, is_chain, describe) -> None:
        self.offset = int(offset)
        self.window = window
        self._dense_args = (block, self.offset, positions, window, is_chain)
        self._describe = describe
        self._desc: Optional[TreeDesc] = None
        self._table: Optional[mx.array] = None
        self._dense: Optional[tuple] = None

    @property
    def desc(self) -> TreeDesc:
        if self._desc is None:
            self._desc = self._describe()
        return self._desc

    @property
    def table(self) -> mx.array:
        """The row table on the device (uploaded once per forward and group)."""
        if self._table is None:
            self._table = mx.array(self.desc.table)
        return self._table

    def dense(self) -> MaskLike:
        """Exactly what ``masks.build_mask`` returns for this group (cached)."""
        if self._dense is None:
            self._dense = (build_mask(*self._dense_args),)
        return self._dense[0]


def layer_mask(base, block: np.ndarray, offset: int, positions: np.ndarray,
               window: Optional[int], is_chain: bool, describe) -> MaskLike:
    """The mask argument for a layer group: a ``TreeMask`` where the fused path may run.

    Tree and multi-stream groups get a ``TreeMask`` when the fused path is
    wanted; plain chains and everything under ``reference`` get exactly
    ``masks.build_mask``.

    Args:
        base: the mlx-lm model (the dispatch must be installed in its module).
        block, offset, positions, window, is_chain: as ``masks.build_mask``.
        describe: zero-argument callable returning the group's ``TreeDesc``
            (``None``: always the dense mask).
    """
    policy = mode()
    wanted = policy == "fused" or (policy == "auto" and fused_impl() is not None)
    # Plain chains (prefill chunks, 1-row decoding) keep the reference and its
    # None / "causal" fast paths, so the baseline is never changed.
    if is_chain or not wanted or describe is None:
        return build_mask(block, offset, positions, window, is_chain)
    if not is_installed(base):
        if policy == "fused":
            raise RuntimeError(f"{ENV}=fused but the attention dispatch is not installed for "
                               f"{type(base).__module__}: call specstream_mlx.attention.install")
        return build_mask(block, offset, positions, window, is_chain)
    return TreeMask(block, offset, positions, window, is_chain, describe)


def _unfit_reason(queries, keys, cache, mask: TreeMask, sinks) -> Optional[str]:
    from .kernels_metal import launch

    if sinks is not None:
        return "attention sinks are not supported by the fused kernel"
    if hasattr(cache, "bits"):
        return "quantized caches are not supported by the fused kernel"
    batch, _, rows, dim = queries.shape
    if batch != 1:
        return f"batch size {batch} (the fused kernel takes 1)"
    if dim not in launch.HEAD_DIMS:
        return f"head dim {dim} (fused kernels exist for {launch.HEAD_DIMS})"
    if queries.dtype not in launch.DTYPES or keys.dtype != queries.dtype:
        return f"dtype {queries.dtype}/{keys.dtype} (fused kernels take float32/float16/bfloat16)"
    if rows > launch.MAX_ROWS:
        return f"{rows} query rows (the fused kernel takes at most {launch.MAX_ROWS})"
    if rows != mask.desc.size or keys.shape[2] != mask.offset + rows:
        return f"shape mismatch: {rows} rows / {keys.shape[2]} keys vs the tree description"
    return None


def _buffers(keys: mx.array, values: mx.array, cache) -> tuple:
    """The whole key/value buffers behind ``keys``/``values`` when the cache has them.

    A ``StepView`` hands out slices of its layer's buffers; passing the buffers
    themselves (row stride = capacity) spares the kernel a copy of the prefix.
    """
    layer = getattr(cache, "layer", None)
    k_buf = getattr(layer, "keys", None)
    v_buf = getattr(layer, "values", None)
    if k_buf is None or v_buf is None or k_buf.shape[:2] != keys.shape[:2]:
        return keys, values
    if k_buf.shape[2] < keys.shape[2] or k_buf.shape[3] != keys.shape[3]:
        return keys, values
    return k_buf, v_buf


def failures() -> dict:
    """The kernel variants that failed in this process (auto mode), with why."""
    return dict(_failed)


def _record_failure(key: tuple, exc: Exception) -> None:
    """Remember a failed variant; one warning line per variant."""
    if key in _failed:
        return
    why = getattr(exc, "why", None) or f"{type(exc).__name__}: {exc}"
    _failed[key] = why
    from .kernels_metal import launch

    what = launch.describe_variant(key) if len(key) == 5 else f"{key[0]}, head dim {key[1]}"
    first = why.strip().splitlines()[0] if why.strip() else type(exc).__name__
    warnings.warn(
        f"fused tree attention failed for {what}; its calls use the reference from now on "
        f"({first}). Set {ENV}=reference to silence this, or report the error",
        RuntimeWarning,
        stacklevel=4,
    )


def _dispatch(fallback, queries, keys, values, cache, scale, mask, sinks):
    if isinstance(mask, TreeMask):
        policy = mode()
        impl = fused_impl() if policy != "reference" else None
        reason = _unfit_reason(queries, keys, cache, mask, sinks) if impl else "no fused kernel on this device"
        call_key = (str(queries.dtype).split(".")[-1], queries.shape[-1])
        if reason is None and policy == "auto" and call_key in _failed:
            reason = "the fused kernel failed for this dtype and head dim"
        if reason is None:
            k_buf, v_buf = _buffers(keys, values, cache)  # (1, Hkv, cap, D) each
            try:
                return impl(queries, k_buf, v_buf, mask.table, mask.offset, mask.desc.n_main,
                            mask.window, scale)
            except Exception as exc:  # a variant that fails to build or launch here
                if policy == "fused":
                    raise
                _record_failure(getattr(exc, "variant", None) or call_key, exc)
                reason = "the fused kernel failed"
        if policy == "fused":
            raise RuntimeError(
                f"{ENV}=fused but this call cannot take the fused kernel: {reason}. "
                f"Unset {ENV} (or set it to auto) to fall back to the reference"
            )
        mask = mask.dense()
    return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def make_dispatch(fallback=_reference):
    """A drop-in for mlx-lm's ``scaled_dot_product_attention`` (same signature and results).

    Tree masks go to the fused kernel when it fits; every other call, and tree
    calls that do not fit (with the dense mask), go to ``fallback``.
    Shapes: queries ``(B, Hq, L, D)``, keys/values ``(B, Hkv, K, D)``.
    """

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        return _dispatch(fallback, queries, keys, values, cache, scale, mask, sinks)

    scaled_dot_product_attention.specstream_fallback = fallback
    return scaled_dot_product_attention


scaled_dot_product_attention = make_dispatch()


def install(base) -> None:
    """Route the attention of ``base``'s mlx-lm module through the dispatch (idempotent).

    The module's own function is kept as the fallback, so non-tree calls
    behave exactly as before.
    """
    module = sys.modules[type(base).__module__]
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is None:
        raise TypeError(
            f"{module.__name__} has no scaled_dot_product_attention to route: "
            "this architecture is not supported by specstream-mlx"
        )
    if not hasattr(current, "specstream_fallback"):
        module.scaled_dot_product_attention = make_dispatch(current)


def is_installed(base) -> bool:
    """Whether ``install(base)`` is in effect for ``base``'s module."""
    module = sys.modules.get(type(base).__module__)
    return hasattr(getattr(module, "scaled_dot_product_attention", None), "specstream_fallback")


def uninstall(base) -> None:
    """Restore the module's own function in ``base``'s module."""
    module = sys.modules[type(base).__module__]
    current = getattr(module, "scaled_dot_product_attention", None)
    if hasattr(current, "specstream_fallback"):
        module.scaled_dot_product_attention = current.specstream_fallback
