"""Teacher-forced main-row cross-entropy of checkpoints on a task's dev completions.

Usage: python scripts/dev_loss.py DATA_DIR CHECKPOINT [CHECKPOINT ...] [--num 40] [--max-seq-len 384]

DATA_DIR holds ``valid.jsonl`` (prompt/completion or messages records, as
written by ``scripts/build_task_data.py``). Loss is on completion tokens only,
over the first ``--num`` records, batches of 4. For a plain fine-tune, give a
checkpoint made with ``specstream-mlx init`` over it. Main rows never see
stream rows (either mode), so no stream rows run (``train.losses.main_loss``).
"""

import argparse
import sys

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)

from specstream_mlx.loading import load
from specstream_mlx.train.data import load_examples
from specstream_mlx.train.losses import main_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--max-seq-len", type=int, default=384)
    args = parser.parse_args()
    for path in args.checkpoints:
        try:
            model, tokenizer = load(path)
            examples = load_examples(args.data, tokenizer, split="valid")[: args.num]
            figures = main_loss(model, examples, args.max_seq_len)
        except ValueError as exc:  # CheckpointError, DataError
            sys.exit(f"error: {exc}")
        print(f"{path} ({model.config.mode}): main CE {figures['main_loss']:.4f} over "
              f"{figures['tokens']} tokens", flush=True)


if __name__ == "__main__":
    main()
