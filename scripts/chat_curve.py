"""Issue 16's learning curve of the chat streams: held-out figures per trained checkpoint.

Usage:
  python scripts/chat_curve.py measure CHECKPOINT --label L --tokens N --capacity C \\
      --heldout HELDOUT.jsonl --out CURVE.json [--prompts benchmarks/chat_prompts.jsonl]
      [--num-prompts 24] [--max-tokens 128] [--trees 1;1,1,1;3,2,1] [--cache-folder DIR]
  python scripts/chat_curve.py plot CURVE.json OUT.png

``measure`` scores one checkpoint and stores it in CURVE.json under its label
(a re-measure replaces it; the file is rewritten atomically):

* held-out top-1 accuracy of each stream (full vocabulary) on HELDOUT.jsonl,
  in all and by each record's ``source`` (chat, gsm8k, ...),
  distilled records (``{"tokens", "loss_start"}``) that no training prefix
  holds (the curve's: the last 200 prompts of the distillation set, distilled
  apart, see docs/distill.md);
* tokens per forward and acceptance by depth of greedy decoding of the
  held-out chat prompts, for each tree of ``--trees`` (widths, ``;`` between
  trees; ``--trees ""``: accuracy only).

``--tokens`` (training tokens, the x axis) and ``--capacity`` (the line it
belongs to, e.g. "4 layers" or "4 layers + LoRA 16") are labels only.
``--cache-folder`` keeps the held-out main stream on disk for the next
checkpoint over the same base model and stream layers.

``plot`` draws accuracy by stream and tokens per forward against training tokens,
one line per capacity (matplotlib, the ``bench`` extra).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)
from specstream_mlx.atomic import atomic_file, atomic_write_text
from specstream_mlx.bench.evaluate import speed_on_prompts
from specstream_mlx.bench.prompts import load_prompts
from specstream_mlx.config import TreeSettings
from specstream_mlx.drafters import make_drafter
from specstream_mlx.loading import load
from stream_accuracy import stream_top1


def measure(args) -> int:
    try:
        with open(args.heldout) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        if not records or not all("tokens" in r and "loss_start" in r for r in records):
            raise ValueError("it needs distilled records, {\"tokens\", \"loss_start\"} per line "
                             "(specstream-mlx distill --out)")
        model, tokenizer = load(str(args.checkpoint))
    except (OSError, ValueError) as exc:  # missing file, bad JSON or records, CheckpointError
        print(f"error: {args.heldout} / {args.checkpoint}: {exc}", file=sys.stderr)
        return 2
    hits, counts = stream_top1(model, records, args.cache_folder)  # (records, gamma) each
    sources = np.array([r.get("source", "?") for r in records])
    by_source = {}
    for source in sorted(set(sources)):
        mine = sources == source
        by_source[source] = [float(h / c) for h, c in zip(hits[mine].sum(0), counts[mine].sum(0))]
    hits, counts = hits.sum(axis=0), counts.sum(axis=0)
    point = {"label": args.label, "checkpoint": str(args.checkpoint), "tokens": args.tokens,
             "capacity": args.capacity, "heldout_positions": int(counts[0]),
             "stream_accuracy": [float(h / c) for h, c in zip(hits, counts)],
             "stream_accuracy_by_source": by_source, "trees": {}}
    print(f"{args.label}: held-out accuracy "
          + " ".join(f"{a:.3f}" for a in point["stream_accuracy"]), flush=True)
    for source, accuracy in by_source.items():
        print(f"  {source}: " + " ".join(f"{a:.3f}" for a in accuracy), flush=True)
    prompts = [p.tokens for p in load_prompts(args.prompts, tokenizer, args.num_prompts,
                                              args.max_tokens, None)]
    for text in filter(None, args.trees.split(";")):
        widths = tuple(int(w) for w in text.split(","))
        tree = TreeSettings(widths, None)
        speed = speed_on_prompts(model, tokenizer, prompts, args.max_tokens,
                                 make_drafter(model, tree))
        point["trees"][text] = {"tokens_per_forward": speed["val_tokens_per_forward"],
                                "acceptance_by_depth": speed["val_acceptance_by_depth"]}
        print(f"{args.label}: tree {text}: {speed['val_tokens_per_forward']:.3f} tokens/forward, "
              "acceptance " + " ".join(f"{a:.2f}" for a in speed["val_acceptance_by_depth"]),
              flush=True)
    curve = json.loads(args.out.read_text()) if args.out.is_file() else {"points": []}
    curve["points"] = [p for p in curve["points"] if p["label"] != args.label] + [point]
    curve.setdefault("commands", []).append(sys.argv)
    atomic_write_text(args.out, json.dumps(curve, indent=2) + "\n")
    return 0


def plot(args) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: no matplotlib (pip install 'specstream-mlx[bench]')", file=sys.stderr)
        return 2
    points = json.loads(args.curve.read_text())["points"]
    lines = {}
    for p in points:
        lines.setdefault(p["capacity"], []).append(p)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    markers = "osD^v"
    for k, (capacity, group) in enumerate(sorted(lines.items())):
        group.sort(key=lambda p: p["tokens"])
        x = [p["tokens"] / 1000 for p in group]
        style = "-" if k == 0 else "--"
        for j in range(len(group[0]["stream_accuracy"])):
            left.plot(x, [p["stream_accuracy"][j] for p in group], markers[k % 5] + style,
                      color=f"C{j}", label=f"stream {j + 1}, {capacity}")
        trees = sorted({t for p in group for t in p["trees"]}, key=len)
        for j, tree in enumerate(trees):
            have = [p for p in group if tree in p["trees"]]
            right.plot([p["tokens"] / 1000 for p in have],
                       [p["trees"][tree]["tokens_per_forward"] for p in have],
                       markers[k % 5] + style, color=f"C{j + 3}", label=f"tree {tree}, {capacity}")
    for axis, title in ((left, "held-out top-1 accuracy"), (right, "tokens per forward, chat prompts")):
        axis.set_xscale("log")
        axis.set_xlabel("training tokens (thousands)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    fig.tight_layout()
    with atomic_file(args.png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("checkpoint", type=Path)
    m.add_argument("--label", required=True)
    m.add_argument("--tokens", type=int, required=True)
    m.add_argument("--capacity", required=True)
    m.add_argument("--heldout", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--prompts", default="benchmarks/chat_prompts.jsonl")
    m.add_argument("--num-prompts", type=int, default=24)
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--trees", default="1;1,1,1;3,2,1")
    m.add_argument("--cache-folder", type=Path, default=None)
    p = sub.add_parser("plot")
    p.add_argument("curve", type=Path)
    p.add_argument("png", type=Path)
    args = parser.parse_args()
    return measure(args) if args.command == "measure" else plot(args)


if __name__ == "__main__":
    sys.exit(main())
