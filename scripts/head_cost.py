"""What a frequency-ranked draft vocabulary (FR-Spec) could save here: LM-head timings.

Usage:
  python scripts/head_cost.py [--model smollm2-135m] [--main-rows 1] [--streams 3]
      [--subsets 4096,8192,16384]

(A chain 1,1,1 forward scores 4 main rows and 4 x 3 stream rows: --main-rows 4 --streams 12.)

Decoding computes the main row's logits and the stream rows' draft logits in
one LM-head matmul (``decode.FUSED_HEAD_ROWS``). A draft vocabulary of the K
most frequent tokens would instead score the stream rows against K rows of
the head: the main rows over the full vocabulary plus ``streams`` rows over K. This script
times both on the model's own LM-head weight (argmax included, as drafting
and verification read it), so the most such a subset can save per forward is
a measured figure, not a guess. It changes nothing in the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import specstream_mlx  # noqa: E402,F401  (loads the optimised BLAS before mlx)


def _time_ms(fn, repeats: int) -> float:
    import mlx.core as mx

    for _ in range(5):
        mx.eval(fn())
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - tic) / repeats * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or name (default: the default model)")
    parser.add_argument("--main-rows", type=int, default=1, help="main rows scored per forward")
    parser.add_argument("--streams", type=int, default=3, help="stream rows scored per forward")
    parser.add_argument("--subsets", default="4096,8192,16384", help="draft vocabulary sizes K")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        subsets = [int(k) for k in args.subsets.split(",") if k.strip()]
    except ValueError:
        subsets = []
    if not subsets or any(k < 1 for k in subsets) or min(args.streams, args.main_rows, args.repeats) < 1:
        print("error: --subsets takes positive integers like 4096,8192; --main-rows, --streams "
              "and --repeats must be positive", file=sys.stderr)
        return 2

    import mlx.core as mx

    from specstream_mlx.cli.app import model_or_default
    from specstream_mlx.families import lm_head, lm_head_weight
    from specstream_mlx.loading import _load_base, resolve_path

    base, _, _, _ = _load_base(resolve_path(model_or_default(args.model)), None)
    try:
        weight = lm_head_weight(base, "head_cost.py")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vocab, hidden = weight.shape
    main = mx.random.normal((args.main_rows, hidden))
    streams = mx.random.normal((args.streams, hidden))
    both = mx.concatenate([main, streams])
    mx.eval(main, streams, both)

    def full(x):  # the decode loop's own call
        return mx.argmax(lm_head(base, x), axis=-1)

    one = _time_ms(lambda: full(main), args.repeats)
    fused = _time_ms(lambda: full(both), args.repeats)
    print(f"LM head {vocab} x {hidden}, {weight.dtype}, {args.repeats} repeats")
    print("| what | ms |")
    print("|---|---|")
    rows = f"{args.main_rows} main row{'s' if args.main_rows > 1 else ''}"
    print(f"| {rows} only (no drafting) | {one:.2f} |")
    print(f"| {rows} + {args.streams} stream rows, one full-vocabulary matmul (today) | {fused:.2f} |")
    for k in subsets:
        if k >= vocab:
            continue
        sub = mx.array(weight[:k])  # its own buffer, as a shipped subset would be
        mx.eval(sub)
        split = _time_ms(lambda: (full(main), mx.argmax(streams @ sub.T, axis=-1)), args.repeats)
        print(f"| {rows} full + {args.streams} stream rows over {k} tokens | {split:.2f} "
              f"(saves {fused - split:+.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
