"""Record a model's greedy tokens on a prompt file, or compare them with a record.

A refactoring must not change what the model says: record before, compare after.

    python scripts/greedy_fingerprint.py benchmarks/chat_prompts.jsonl before.json
    # ... change the code ...
    python scripts/greedy_fingerprint.py benchmarks/chat_prompts.jsonl after.json --compare before.json

Each prompt is decoded greedily with the checkpoint's default drafter (chat
template applied, as ``specstream-mlx generate`` does); the record keeps the
tokens and tokens per forward of every prompt. ``--compare`` exits 1 when any
prompt's tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import specstream_mlx  # noqa: F401  (OpenBLAS before mlx)
from specstream_mlx import load, stream_generate
from specstream_mlx.bench.prompts import load_prompts


def record(model_path: str, prompts_file: str, max_tokens: int) -> list:
    model, tokenizer = load(model_path)
    prompts = load_prompts(prompts_file, tokenizer, None, max_tokens, None)
    out = []
    for i, prompt in enumerate(prompts, start=1):
        tokens, last = [], None
        for last in stream_generate(model, tokenizer, prompt.tokens, max_tokens):
            tokens.append(last.token)
        out.append({"tokens": tokens, "tokens_per_forward": last.tokens_per_forward})
        print(f"\r[fingerprint] {i}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompts", help="JSONL prompt file (bench format)")
    parser.add_argument("out", type=Path, help="where to write this run's record (JSON)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compare", type=Path, help="an earlier record to compare with")
    args = parser.parse_args()
    if args.compare is not None and not args.compare.is_file():
        print(f"error: no record at {args.compare}", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from specstream_mlx.convert.default_model import default_model_path

        model = str(default_model_path())
    runs = record(model, args.prompts, args.max_tokens)
    args.out.write_text(json.dumps(runs) + "\n")
    total = sum(len(r["tokens"]) for r in runs)
    print(f"{len(runs)} prompts, {total} tokens -> {args.out}")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    if len(before) != len(runs):
        print(f"differs: {len(before)} prompts recorded, {len(runs)} now")
        return 1
    changed = [i for i, (a, b) in enumerate(zip(before, runs)) if a["tokens"] != b["tokens"]]
    print(f"identical tokens on {len(runs) - len(changed)}/{len(runs)} prompts"
          + (f"; differ on {changed}" if changed else ""))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
