"""Greedy chain decoding with and without the overlapped loop (``SPECSTREAM_OVERLAP``).

Decodes the first prompts of a JSONL file with a chain tree, alternating the
two loops for a few rounds, and prints milliseconds per decode step (prefill
excluded, stopping at EOS), tokens per forward and tokens/s for each, then
whether both loops emitted the same tokens. Run it with the machine otherwise
idle.

Usage: .venv/bin/python scripts/overlap_timing.py MODEL DATA [--widths 1,1,1]
       [--prompts 3] [--max-tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

from specstream_mlx import _blas

_blas.preload()

from specstream_mlx.bench.prompts import load_prompts  # noqa: E402  (after the BLAS preload)
from specstream_mlx.config import TreeSettings  # noqa: E402
from specstream_mlx.decode import decode  # noqa: E402
from specstream_mlx.drafters import make_drafter  # noqa: E402
from specstream_mlx.overlap import ENV  # noqa: E402


def _run(model, prompts, tree, max_tokens, eos):
    """(ms per step, tokens per forward, tokens/s, tokens per prompt) over all prompts."""
    elapsed = steps = emitted = 0
    outputs = []
    for prompt in prompts:
        out, tic = [], None
        for step in decode(model, prompt.tokens, max_tokens, drafter=make_drafter(model, tree)):
            out += step.tokens
            if step.prefill:
                tic = time.perf_counter()
                continue
            steps += 1
            emitted += len(step.tokens)
            if eos & set(step.tokens) or len(out) >= max_tokens:
                break
        elapsed += time.perf_counter() - tic
        outputs.append(out)
    return elapsed / steps * 1e3, emitted / steps, emitted / elapsed, outputs


def main() -> None:
    from specstream_mlx.cli.app import model_or_default  # the CLI's names (smollm2-135m-e2e-nlg, ...)
    from specstream_mlx.loading import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory or shipped model name")
    parser.add_argument("data", help="JSONL prompts (bench's format)")
    parser.add_argument("--widths", default="1,1,1", help="the chain (all widths 1)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load(model_or_default(args.model))
    tree = TreeSettings(tuple(int(w) for w in args.widths.split(",")), None)
    prompts = load_prompts(args.data, tokenizer, args.prompts, args.max_tokens, None)
    eos = set(tokenizer.eos_token_ids)
    outputs = {}
    for flag in ("0", "1") * (args.rounds + 1):  # the first pair warms up
        os.environ[ENV] = flag
        ms, per_forward, tps, out = _run(model, prompts, tree, args.max_tokens, eos)
        if flag in outputs or len(outputs) == 2:
            print(f"overlap={flag} {ms:6.1f} ms/step  tokens/forward {per_forward:.2f}  {tps:.1f} tok/s",
                  flush=True)
        outputs.setdefault(flag, out)
    print("same tokens:", outputs["0"] == outputs["1"])


if __name__ == "__main__":
    main()
