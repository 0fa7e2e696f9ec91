"""Embed specstream-mlx in a Python app, without the HTTP server.

Two ways, both in-process:

1. ``direct``: load the model and call ``stream_generate`` on the thread you
   are on. Simplest; fine for scripts and command-line tools.
2. ``engine``: an ``Engine`` owns the model on its own worker thread (MLX is
   not safe for concurrent use of one model) and queues requests; your UI
   thread submits a prompt and reads text events, and can cancel. This is
   what the HTTP server runs on.

Usage::

    python apps/python_embed_example.py --model path/to/checkpoint \
        [--prompt "Hello"] [--max-tokens 64] [--mode direct|engine]
"""

from __future__ import annotations

import argparse
import sys

from specstream_mlx import load, stream_generate
from specstream_mlx.serve.worker import Engine, GenerationRequest
from specstream_mlx.generate import encode_prompt
from specstream_mlx.prompts import format_prompt
from specstream_mlx.verify import SamplingParams


def direct(model_path: str, prompt: str, max_tokens: int) -> None:
    """Generate on this thread, printing text as it comes."""
    model, tokenizer = load(model_path)
    last = None
    for last in stream_generate(model, tokenizer, format_prompt(tokenizer, prompt), max_tokens):
        print(last.text, end="", flush=True)
    print(f"\n[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
          f"{last.tokens_per_forward:.2f} tokens per forward]")


def engine(model_path: str, prompt: str, max_tokens: int) -> None:
    """Generate on the engine's worker thread; this thread only reads events."""
    worker = Engine(lambda: load(model_path), max_queue=4).start()
    try:
        tokenizer = worker.tokenizer
        tokens = encode_prompt(tokenizer, format_prompt(tokenizer, prompt))
        # Sampling settings travel as one SamplingParams (greedy here: temp=0).
        job = worker.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                                              sampling=SamplingParams(temp=0.0), stop=("\n\n",)))
        # A UI would run this loop off its main thread and call job.cancel()
        # when the user presses "Stop".
        for kind, value in job.events():
            if kind == "text":
                print(value, end="", flush=True)
            elif kind == "error":
                sys.exit(f"error: {value}")
            else:
                stats = value.stats
                print(f"\n[{value.completion_tokens} tokens, finish: {value.finish_reason}, "
                      f"{stats['generation_tps']:.1f} tokens/s, "
                      f"{stats['tokens_per_forward']:.2f} tokens per forward]")
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or HF repo id")
    parser.add_argument("--prompt", default="Write a haiku about the sea.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mode", choices=("direct", "engine"), default="engine")
    args = parser.parse_args()
    run = direct if args.mode == "direct" else engine
    run(args.model, args.prompt, args.max_tokens)


if __name__ == "__main__":
    main()
