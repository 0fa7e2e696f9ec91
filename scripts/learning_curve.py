"""Learning curve of a training run: dev loss and dev tokens per forward per saved step.

Usage: python scripts/learning_curve.py DEV.jsonl SNAPSHOTS_DIR OUT_DIR
           [--num 40] [--prompts 8] [--max-tokens 64] [--tree 3,2,1] [--max-nodes 16] [--title T]
           [--steps 300,500] [--baseline BASELINE_SNAPSHOTS_DIR]

SNAPSHOTS_DIR holds checkpoints named ``step_N`` (as
``scripts/snapshot_checkpoints.sh`` keeps them). For each, in step order:

* dev loss: teacher-forced main-row cross-entropy on the completions of the
  first ``--num`` dev records (``train.losses.main_loss``);
* dev tokens per forward and acceptance by depth: greedy decoding of the first
  ``--prompts`` dev prompts, ``--max-tokens`` each, with the given tree
  (default: the checkpoint's tree for this backend).

``--steps`` keeps only those steps; ``--baseline`` adds the dev loss of another
run's snapshots at the same steps (the plain-LoRA baseline: same data, steps and
schedule), drawn dashed.

Writes ``OUT_DIR/curve.json`` and ``OUT_DIR/curve.png`` (matplotlib, the
``bench`` extra), each through a temporary file renamed at the end. Use dev
data only: the curve chooses the step that ships.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)
from specstream_mlx.atomic import atomic_file, atomic_write_text
from specstream_mlx.bench.evaluate import speed_on_prompts
from specstream_mlx.config import TreeSettings
from specstream_mlx.drafters import make_drafter
from specstream_mlx.loading import load
from specstream_mlx.train.data import load_examples
from specstream_mlx.train.losses import main_loss


def snapshots(folder: Path) -> list:
    """``[(step, path)]`` of ``step_N`` folders, by step."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def measure(path: Path, dev: str, args) -> dict:
    model, tokenizer = load(str(path))
    examples = load_examples(dev, tokenizer)
    loss = main_loss(model, examples[: args.num], args.max_seq_len)
    prompts = [list(e.tokens[: e.loss_start]) for e in examples[: args.prompts]]
    tree = None
    if args.tree:
        tree = TreeSettings(tuple(int(w) for w in args.tree.split(",")), args.max_nodes or None)
    speed = speed_on_prompts(model, tokenizer, prompts, args.max_tokens,
                             make_drafter(model, tree))
    return {"dev_loss": loss["main_loss"], "dev_loss_tokens": loss["tokens"],
            "tokens_per_forward": speed["val_tokens_per_forward"],
            "acceptance_by_depth": speed["val_acceptance_by_depth"]}


def plot(points: list, out: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib (pip install 'specstream-mlx[bench]'): no plot", file=sys.stderr)
        return False
    steps = [p["step"] for p in points]
    fig, left = plt.subplots(figsize=(6.4, 3.6))
    left.plot(steps, [p["dev_loss"] for p in points], "o-", color="tab:blue", label="dev loss")
    base = [(p["step"], p["baseline_dev_loss"]) for p in points if "baseline_dev_loss" in p]
    if base:
        left.plot([b[0] for b in base], [b[1] for b in base], "o--", color="tab:cyan",
                  label="dev loss, plain-LoRA baseline")
        left.legend(loc="upper center", fontsize=8)
    left.set_xlabel("training step")
    left.set_ylabel("dev loss (nats/token)", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [p["tokens_per_forward"] for p in points], "s-", color="tab:red")
    right.set_ylabel("dev tokens per forward", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dev", help="dev JSONL (prompt/completion or messages records)")
    parser.add_argument("snapshots", type=Path, help="folder of step_N checkpoints")
    parser.add_argument("out", type=Path, help="folder for curve.json and curve.png")
    parser.add_argument("--num", type=int, default=40, help="dev records for the loss")
    parser.add_argument("--prompts", type=int, default=8, help="dev prompts for tokens per forward")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--tree", default=None, help="tree widths, e.g. 3,2,1 (default: the checkpoint's)")
    parser.add_argument("--max-nodes", type=int, default=0, help="with --tree: node cap (0: none)")
    parser.add_argument("--title", default=None, help="plot title (default: the snapshots folder)")
    parser.add_argument("--steps", default=None, help="only these steps, e.g. 300,500,1000")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="snapshots of a baseline run: its dev loss at the same steps")
    args = parser.parse_args()
    found = snapshots(args.snapshots)
    if args.steps:
        keep = {int(x) for x in args.steps.split(",") if x}
        found = [(step, path) for step, path in found if step in keep]
    baseline = dict(snapshots(args.baseline)) if args.baseline else {}
    if not found:
        print(f"error: {args.snapshots} holds no step_N checkpoint folders", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for step, path in found:
        try:
            figures = measure(path, args.dev, args)
        except ValueError as exc:  # CheckpointError, RecordError, bad tree
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        if step in baseline:
            model, tokenizer = load(str(baseline[step]))
            figures["baseline_dev_loss"] = main_loss(model, load_examples(args.dev, tokenizer)[: args.num],
                                                     args.max_seq_len)["main_loss"]
        points.append({"step": step, **figures})
        print(f"step {step}: dev loss {figures['dev_loss']:.4f}"
              + (f" (baseline {figures['baseline_dev_loss']:.4f})" if "baseline_dev_loss" in figures else "")
              + ", tokens/forward "
              f"{figures['tokens_per_forward']:.3f}, acceptance "
              + " ".join(f"{a:.2f}" for a in figures["acceptance_by_depth"]), flush=True)
        atomic_write_text(args.out / "curve.json",
                          json.dumps({"command": sys.argv, "points": points}, indent=2) + "\n")
    plot(points, args.out / "curve.png", args.title or args.snapshots.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
