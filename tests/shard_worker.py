"""One rank of a sharded run, started by ``mlx.launch`` from ``test_shard.py``.

    shard_worker.py CKPT OUT MODE   (MODE: tensor | pipeline)

Decodes fixed prompts greedily (tree and chain drafts, and plain decoding) and
with sampling, and writes this rank's tokens, tokens per forward and the number
of collective operations to OUT/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

from specstream_mlx import drafters
from specstream_mlx.config import TreeSettings
from specstream_mlx.generate import stream_generate
from specstream_mlx.loading import load

PROMPTS = [[217, 163, 130, 69, 78, 10, 19, 4], [121, 131, 193, 243, 8, 36, 210, 242]]  # no EOS in 20 greedy tokens


def main() -> None:
    ckpt, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    model, tokenizer = load(ckpt, shard=mode)
    rank = mx.distributed.init().rank()
    results = {}
    for name, tree, speculative, temp in (("tree", (3, 2, 1), True, 0.0), ("chain", (1, 1, 1), True, 0.0),
                                          ("plain", (1,), False, 0.0), ("sampled", (2, 1), True, 1.0)):
        drafter = drafters.make_drafter(model, TreeSettings(tree, None), speculative=speculative)
        runs = []
        for i, prompt in enumerate(PROMPTS):
            tokens, last = [], None
            for last in stream_generate(model, tokenizer, prompt, 16, temp=temp, seed=7 + i,
                                        drafter=drafter):
                tokens.append(last.token)
            runs.append({"tokens": tokens, "tokens_per_forward": last.tokens_per_forward})
        results[name] = runs
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
