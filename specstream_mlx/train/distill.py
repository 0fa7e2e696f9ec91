"""Self-distillation: replace completions by the model's own greedy continuation.

In lossless mode verification accepts a draft only where it equals the base
model's greedy choice, so the best training targets for the streams are the
base model's own greedy outputs on the training prompts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .data import Example


def distill(
    base,
    tokenizer,
    examples: Sequence[Example],
    max_tokens: int = 128,
    batch_size: int = 32,
    cache_file: Optional[Path] = None,
) -> List[Example]:
    """Greedy continuations of each example's prompt by ``base`` (batched).

    Args:
        base: the mlx-lm model whose outputs the streams should learn.
        tokenizer: its tokenizer.
        examples: examples whose ``tokens[:loss_start]`` are prompts (an
            example with no prompt part uses its first half as the prompt).
        max_tokens: tokens generated per prompt.
        batch_size: prompts decoded together.
        cache_file: JSONL of finished examples; reused (and extended) so an
            interrupted distillation does not start over.

    Returns:
        New examples: prompt + greedy continuation, loss on the continuation.
    """
    from mlx_lm import batch_generate

    prompts = []
    for example in examples:
        cut = example.loss_start or max(1, len(example.tokens) // 2)
        prompts.append(list(example.tokens[:cut]))
    done: List[Example] = []
    if cache_file is not None and cache_file.is_file():
        lines = cache_file.read_text().splitlines()
        for number, line in enumerate(lines[: len(examples)], 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{cache_file}:{number} is not valid JSON; delete the file") from None
                # A run killed while appending leaves a partial last line: drop it.
                cache_file.write_text("".join(f"{kept}\n" for kept in lines[: number - 1]))
                break
            if record["tokens"][: record["loss_start"]] != prompts[number - 1]:
                raise ValueError(
                    f"{cache_file}:{number} holds another prompt than the data's example "
                    f"{number}: the data changed since it was written; delete the file"
                )
            done.append(Example(tuple(record["tokens"]), record["loss_start"]))
    prompts = prompts[len(done):]
    tic = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        response = batch_generate(base, tokenizer, chunk, max_tokens=max_tokens,
                                  return_token_ids=True)
        new = [Example(tuple(p + list(ids)), len(p)) for p, ids in zip(chunk, response.token_ids)]
        done.extend(new)
        if cache_file is not None:
            with open(cache_file, "a") as handle:
                for e in new:
                    handle.write(json.dumps({"tokens": list(e.tokens), "loss_start": e.loss_start}) + "\n")
        rate = (start + len(chunk)) / (time.perf_counter() - tic)
        print(f"\r[distill] {len(done)}/{len(examples)} prompts ({rate:.2f} prompts/s)",
              file=sys.stderr, end="", flush=True)
    print(file=sys.stderr)
    return done
