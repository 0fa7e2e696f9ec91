"""What one more row costs, op by op, in one decoder layer of the default model's shape.

The tree forward's cost grows with its rows (main nodes and stream rows). This
times the parts of one layer at 1, 4, 16 and 64 rows, with 250 cached
positions: one MLP matmul (576 -> 1536), attention (9 query heads over 3 key /
value heads, head size 64, boolean mask), SiLU times gate, and the LM head
(49,152 x 576), in microseconds, best-effort median of repeats. Run it with
the machine otherwise idle.

Usage: .venv/bin/python scripts/row_cost_ops.py [--context 250]
"""

from __future__ import annotations

import argparse
import time

from specstream_mlx import _blas

_blas.preload()

import mlx.core as mx  # noqa: E402  (after the BLAS preload)
import mlx.nn as nn  # noqa: E402


def _time(fn, *args, repeats: int = 100) -> float:
    for _ in range(5):
        mx.eval(fn(*args))
    samples = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        samples.append(time.perf_counter() - tic)
    return sorted(samples)[len(samples) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=250, help="cached positions")
    args = parser.parse_args()
    key = mx.random.key(0)
    up = mx.random.normal((1536, 576), key=key) * 0.02
    head = mx.random.normal((49152, 576), key=key) * 0.02
    mx.eval(up, head)
    print("| rows | MLP matmul (us) | attention (us) | SiLU x gate (us) | LM head (us) |")
    print("|---|---|---|---|---|")
    for rows in (1, 4, 16, 64):
        x = mx.random.normal((1, rows, 576), key=key)
        q = mx.random.normal((1, 9, rows, 64), key=key)
        kv = mx.random.normal((1, 3, args.context + rows, 64), key=key)
        mask = mx.ones((rows, args.context + rows), dtype=mx.bool_)
        gate = mx.random.normal((1, rows, 1536), key=key)
        mx.eval(x, q, kv, mask, gate)
        mlp = _time(lambda a: a @ up.T, x)
        attention = _time(lambda a: mx.fast.scaled_dot_product_attention(a, kv, kv, scale=0.125,
                                                                        mask=mask), q)
        silu = _time(lambda a: nn.silu(a) * a, gate)
        logits = _time(lambda a: a @ head.T, x, repeats=20)
        print(f"| {rows} | {mlp:.0f} | {attention:.0f} | {silu:.0f} | {logits:.0f} |")


if __name__ == "__main__":
    main()
