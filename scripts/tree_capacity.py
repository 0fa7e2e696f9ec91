"""Tokens per forward of a checkpoint's streams as the draft tree widens.

Usage: python scripts/tree_capacity.py CHECKPOINT PROMPTS.jsonl TREE [TREE ...]
         [--num-prompts 6] [--max-tokens 128]

CHECKPOINT ``default`` is the embedded default model with its shipped streams.
TREE is ``WIDTHS:MAX_NODES`` (``3,2,1:16``; ``0`` for no cap). Greedy,
lossless decoding of each prompt (``{"prompt"}`` records, chat template
applied); prints tokens per forward and acceptance by depth per tree. A
measure of how much the streams' top-k lists hold, not of speed: use
``specstream-mlx bench --sweep`` for that.
"""

import argparse
import json

import specstream_mlx  # noqa: F401  (loads OpenBLAS before mlx on Linux)
from specstream_mlx import load
from specstream_mlx.decode import TreeSettings
from specstream_mlx.evaluate import speed_on_prompts
from specstream_mlx.prompts import format_messages


def parse_tree(text: str) -> TreeSettings:
    widths, _, cap = text.partition(":")
    nodes = int(cap) if cap and cap != "0" else None
    return TreeSettings(tuple(int(w) for w in widths.split(",")), nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prompts")
    parser.add_argument("trees", nargs="+", help="WIDTHS:MAX_NODES, e.g. 3,2,1:16")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint == "default":
        from specstream_mlx.convert.default_model import default_model_path

        checkpoint = str(default_model_path(quiet=True))
    model, tokenizer = load(checkpoint)
    with open(args.prompts, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()][: args.num_prompts]
    prompts = [format_messages(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    print("| tree | tokens/forward | acceptance by depth |")
    print("|---|---|---|")
    for text in args.trees:
        figures = speed_on_prompts(model, tokenizer, prompts, args.max_tokens, parse_tree(text))
        depth = " ".join(f"{a:.3f}" for a in figures["val_acceptance_by_depth"])
        print(f"| {text} | {figures['val_tokens_per_forward']:.3f} | {depth} |", flush=True)


if __name__ == "__main__":
    main()
