"""Held-out top-1 accuracy of each stream (full vocabulary) on self-distilled examples.

Usage: python scripts/stream_accuracy.py CHECKPOINT DISTILLED.jsonl [FIRST_LINE]
(DISTILLED.jsonl: the `<out>.distilled.jsonl` cache that `train --distill` writes;
lines from FIRST_LINE on, counted from 0, are scored.)
"""

import json
import sys

import specstream_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from specstream_mlx.train.cached import precompute, stream_hidden
from specstream_mlx.train.data import Example
from specstream_mlx.forward import logits
from specstream_mlx.loading import load


def stream_top1(model, records, folder=None):
    """``(hits, counts)``, numpy ``(len(records), gamma)``: per record and stream,
    the top-1 guesses of the stream rows that equal the distilled token, and the
    answer positions scored (sum over axis 0 for the whole set).

    ``folder``: keep the main stream's states there (``precompute``), so that
    another checkpoint of the same base model and stream layers reuses them.
    """
    gamma = model.config.gamma
    hits, counts = np.zeros((len(records), gamma)), np.zeros((len(records), gamma))
    examples = [Example(tuple(r["tokens"]), r["loss_start"]) for r in records]
    for i, main_stream in enumerate(precompute(model, examples, folder=folder)):
        positions, hidden = stream_hidden(model, main_stream)  # (R,), (R, gamma, H)
        length = len(main_stream.tokens)
        for j in range(1, gamma + 1):
            target_at = positions + 1 + j  # stream j of row t guesses token t + 1 + j
            use = (target_at < length) & (target_at >= main_stream.loss_start)
            guess = np.array(mx.argmax(logits(model, hidden[:, j - 1]), axis=-1))
            hits[i, j - 1] = (guess[use] == main_stream.tokens[target_at[use]]).sum()
            counts[i, j - 1] = use.sum()
    return hits, counts


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    model, _ = load(sys.argv[1])
    first = int(sys.argv[3]) if len(sys.argv) == 4 else 0
    with open(sys.argv[2]) as handle:
        records = [json.loads(line) for line in handle][first:]
    if not records:
        sys.exit(f"no examples in {sys.argv[2]} from line {first}")
    hits, counts = stream_top1(model, records)
    hits, counts = hits.sum(axis=0), counts.sum(axis=0)
    print(" ".join(f"stream {j + 1}: {hits[j] / counts[j]:.3f}" for j in range(len(hits))),
          f"({int(counts[0])} positions)")


if __name__ == "__main__":
    main()
