"""Tokens per forward of a checkpoint's streams as the draft tree widens.

Usage: python scripts/tree_capacity.py CHECKPOINT PROMPTS.jsonl TREE [TREE ...]
         [--num-prompts 6] [--max-tokens 128]

CHECKPOINT ``default`` is the embedded default model with its shipped streams.
TREE is ``WIDTHS:MAX_NODES`` (``3,2,1:16``; ``0`` for no cap). Prompts are read
as ``specstream-mlx bench`` reads them (``prompt``, ``messages`` or ``text``
records, chat template applied). Greedy, lossless decoding of each; prints
tokens per forward and acceptance by depth per tree. A measure of how much the
streams' top-k lists hold, not of speed: use ``specstream-mlx bench --sweep``
for that.
"""

import argparse
import sys

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)
from specstream_mlx import load
from specstream_mlx.bench.prompts import load_prompts
from specstream_mlx.config import TreeSettings
from specstream_mlx.bench.evaluate import speed_on_prompts
from specstream_mlx.drafters import make_drafter
from specstream_mlx.generate import max_context


def parse_tree(text: str) -> TreeSettings:
    """``"3,2,1:16"`` -> widths (3, 2, 1), at most 16 nodes (``:0`` or none: no cap)."""
    widths, _, cap = text.partition(":")
    try:
        values = tuple(int(w) for w in widths.split(","))
        nodes = int(cap) if cap and cap != "0" else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"tree {text!r}: expected WIDTHS:MAX_NODES like 3,2,1:16")
    if not values or min(values) < 1 or (nodes is not None and nodes < 1):
        raise argparse.ArgumentTypeError(f"tree {text!r}: widths and the node cap must be >= 1")
    return TreeSettings(values, nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prompts")
    parser.add_argument("trees", nargs="+", type=parse_tree, help="WIDTHS:MAX_NODES, e.g. 3,2,1:16")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint == "default":
        from specstream_mlx.convert.default_model import default_model_path

        checkpoint = str(default_model_path(quiet=True))
    try:
        model, tokenizer = load(checkpoint)
        prompts = load_prompts(args.prompts, tokenizer, args.num_prompts, args.max_tokens,
                               max_context(model))
    except ValueError as exc:  # CheckpointError, BenchError
        sys.exit(f"error: {exc}")
    print("| tree (widths : max nodes) | tokens/forward | acceptance by depth |")
    print("|---|---|---|")
    for tree in args.trees:
        figures = speed_on_prompts(model, tokenizer, [p.tokens for p in prompts],
                                   args.max_tokens, make_drafter(model, tree))
        depth = " ".join(f"{a:.3f}" for a in figures["val_acceptance_by_depth"])
        label = f"{','.join(map(str, tree.widths))} : {tree.max_nodes or 'all'}"
        print(f"| {label} | {figures['val_tokens_per_forward']:.3f} | {depth} |", flush=True)


if __name__ == "__main__":
    main()
