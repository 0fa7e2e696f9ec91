"""Micro-benchmark: fused tree attention vs the reference, by tree size and prefix length.

One multi-stream layer call per configuration: ``nodes`` tree rows plus
``gamma`` stream rows each, against a cached prefix. Timed:

* ``reference``: ``mx.fast.scaled_dot_product_attention`` with a prebuilt
  dense boolean mask (the mask already on the device);
* ``reference+mask``: the same, building and uploading the mask each call
  (what the runtime pays per layer group without the fused kernel);
* ``fused``: the kernel of this backend (Metal or CUDA), given the compact
  row table; absent on the CPU.

Run: ``specstream-mlx bench-kernel`` (options: ``--help``).
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import mlx.core as mx
import numpy as np

from ..masks import build_mask, msa_block, row_positions
from ..tree import build_tree
from ..treedesc import describe
from . import launch

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _rows_of(nodes: int):
    from ..masks import tree_rows

    widths = (4, 3, 2, 2)
    return tree_rows(build_tree(widths, max_nodes=nodes))


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (evaluated) in milliseconds."""
    for _ in range(2):
        mx.eval(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - start)
    return 1e3 * float(np.median(samples))


def bench_one(nodes: int, prefix: int, gamma: int, heads: int, kv_heads: int, head_dim: int,
              dtype: str, repeats: int, window: Optional[int] = None) -> dict:
    """Timings (ms) of one configuration, plus the fused/reference max difference."""
    rows = _rows_of(nodes)
    desc = describe(rows, gamma, True)
    block = msa_block(rows, gamma)
    positions = row_positions(rows, gamma, True)
    size = desc.size
    key = mx.random.key(0)
    kq, kk, kv = mx.random.split(key, 3)
    dt = DTYPES[dtype]
    q = mx.random.normal((1, heads, size, head_dim), key=kq).astype(dt)
    k = mx.random.normal((1, kv_heads, prefix + size, head_dim), key=kk).astype(dt)
    v = mx.random.normal((1, kv_heads, prefix + size, head_dim), key=kv).astype(dt)
    scale = head_dim**-0.5
    mask = build_mask(block, prefix, positions, window)
    mx.eval(q, k, v, mask)

    def reference():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def reference_with_mask():
        fresh = build_mask(block, prefix, positions, window)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=fresh)

    result = dict(nodes=int(rows.size), rows=size, prefix=prefix, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, dtype=dtype, backend=launch.backend() or "cpu",
                  reference_ms=_time(reference, repeats),
                  reference_mask_ms=_time(reference_with_mask, repeats))
    if launch.backend() is not None:
        def fused():
            table = mx.array(desc.table)
            return launch.tree_attention(q, k, v, table, prefix, desc.n_main, window, scale)

        result["fused_ms"] = _time(fused, repeats)
        diff = mx.abs(fused().astype(mx.float32) - reference().astype(mx.float32)).max()
        result["max_abs_diff"] = float(diff)
        result["speedup"] = result["reference_mask_ms"] / result["fused_ms"]
    return result


def run(tree_sizes: Iterable[int], prefixes: Iterable[int], gamma: int = 3, heads: int = 32,
        kv_heads: int = 8, head_dim: int = 128, dtype: str = "float16", repeats: int = 20,
        window: Optional[int] = None) -> list:
    """Benchmark every (tree size, prefix) pair; one result dict each."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return [bench_one(n, p, gamma, heads, kv_heads, head_dim, dtype, repeats, window)
            for n in tree_sizes for p in prefixes]


def format_table(results: list) -> str:
    """Results as a fixed-width text table."""
    head = (f"{'nodes':>5} {'rows':>5} {'prefix':>6}  {'reference':>10} {'ref+mask':>10} "
            f"{'fused':>10} {'speedup':>8} {'max|diff|':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        fused = f"{r['fused_ms']:10.3f}" if "fused_ms" in r else f"{'n/a':>10}"
        speed = f"{r['speedup']:7.2f}x" if "speedup" in r else f"{'':>8}"
        diff = f"{r['max_abs_diff']:10.2e}" if "max_abs_diff" in r else f"{'':>10}"
        lines.append(f"{r['nodes']:5d} {r['rows']:5d} {r['prefix']:6d}  {r['reference_ms']:10.3f} "
                     f"{r['reference_mask_ms']:10.3f} {fused} {speed} {diff}")
    if results and "fused_ms" not in results[0]:
        lines.append(f"(no fused kernel on backend {results[0]['backend']}: reference only; "
                     "the fused columns need a Metal or CUDA GPU)")
    return "\n".join(lines)
