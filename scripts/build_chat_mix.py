"""Build the prompt mix used to train the default model's streams (lossless, chat).

Prompts come from ../shared/datasets (DialogSum, GSM8K, E2E-NLG, Spider) plus
templated chat requests written here. Completions are left out: training runs
with --distill, so the targets are SmolLM2's own greedy answers. The held-out
evaluation prompts in benchmarks/chat_prompts.jsonl use other topics and
request forms and are never part of this mix.

Usage: python scripts/build_chat_mix.py --shared ../shared --out work/chat_mix.jsonl
"""

import argparse
import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_requests import assistant_prompts  # noqa: E402

TOPICS = [
    "volcanoes", "the water cycle", "black holes", "honeybees", "the Roman Empire",
    "machine learning", "coffee", "the human heart", "electric cars", "rainbows",
    "the Great Wall of China", "chess", "vaccines", "recycling", "the moon landing",
    "jazz music", "sourdough bread", "earthquakes", "the internet", "penguins",
    "solar panels", "the French Revolution", "sleep", "climate change", "octopuses",
    "the stock market", "photosynthesis", "gravity", "the Olympic Games", "tea",
]
TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "Give me three interesting facts about {t}.",
    "What are the pros and cons of {t}?",
    "Write a short story that involves {t}.",
    "Summarize the history of {t} in a few sentences.",
]


def chat_prompts():
    return [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]


def dataset_prompts(shared: Path, rng: random.Random, per_task: int):
    out = []
    rows = [json.loads(l) for l in open(shared / "datasets/dialogsum/dialogsum.train.jsonl")]
    for row in rng.sample(rows, per_task):
        out.append(f"Summarize the following dialogue.\n\n{row['dialogue']}")
    rows = [json.loads(l) for l in open(shared / "datasets/gsm8k/train.jsonl")]
    out += [row["question"] for row in rng.sample(rows, per_task)]
    with open(shared / "datasets/e2e_nlg/devset.csv") as handle:
        mrs = sorted({row["mr"] for row in csv.DictReader(handle)})
    for mr in rng.sample(mrs, per_task):
        out.append(f"Write one sentence describing a restaurant with these attributes: {mr}")
    rows = json.load(open(shared / "datasets/spider/train_spider.slim.json"))
    for row in rng.sample(rows, per_task):
        out.append(f"Write an SQL query that answers: {row['question']}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-task", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = chat_prompts() + assistant_prompts() + dataset_prompts(args.shared, rng, args.per_task)
    rng.shuffle(prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as handle:
        for prompt in prompts:
            # The completion is a placeholder: --distill replaces it.
            handle.write(json.dumps({"prompt": prompt, "completion": "."}) + "\n")
    print(f"wrote {len(prompts)} prompts to {args.out}")


if __name__ == "__main__":
    main()
