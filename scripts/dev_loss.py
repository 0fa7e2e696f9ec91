"""Teacher-forced main-row cross-entropy of checkpoints on a task's dev completions.

Usage: python scripts/dev_loss.py DATA_DIR CHECKPOINT [CHECKPOINT ...] [--num 40] [--max-seq-len 384]

DATA_DIR holds ``valid.jsonl`` (prompt/completion or messages records, as
written by ``scripts/build_task_data.py``). Loss is on completion tokens only,
over the first ``--num`` records, batches of 4. For a plain fine-tune, give a
checkpoint made with ``specstream-mlx init`` over it (main rows are the model's
own in lossless mode); for shared mode the main rows see their streams, as in
decoding.
"""

import argparse
import sys

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)
import mlx.core as mx

from specstream_mlx.train.data import collate, load_examples
from specstream_mlx.loading import load
from specstream_mlx.train.losses import LossWeights, loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--max-seq-len", type=int, default=384)
    args = parser.parse_args()
    weights = LossWeights(main=1.0, stream=0.0, early_exit=0.0)
    for path in args.checkpoints:
        try:
            model, tokenizer = load(path)
            examples = load_examples(args.data, tokenizer, split="valid")[: args.num]
        except ValueError as exc:  # CheckpointError, DataError
            sys.exit(f"error: {exc}")
        total = count = 0.0
        for start in range(0, len(examples), 4):
            indices = list(range(start, min(start + 4, len(examples))))
            tokens, mask = collate(examples, indices, args.max_seq_len)
            _, metrics = loss_fn(model, mx.array(tokens), mask, weights)
            targets = float(mask[:, 1:].sum())
            total += metrics["main_loss"].item() * targets
            count += targets
        print(f"{path} ({model.config.mode}): main CE {total / count:.4f} over {int(count)} tokens",
              flush=True)


if __name__ == "__main__":
    main()
