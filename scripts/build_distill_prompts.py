"""Build the prompt set for `specstream-mlx distill` (issue 16: >= 1M distilled tokens).

Usage:
  python scripts/build_distill_prompts.py --shared ../shared \
      [--out ~/.cache/specstream-mlx/distill/prompts.jsonl] [--seed 0] [--task-seed 0]

Sources (default counts; a count larger than its pool takes the whole pool):

* chat: every templated chat request (build_chat_mix.chat_prompts and
  chat_requests.assistant_prompts), and ``--chat-styled`` restyled copies of
  each ("... Keep it short.", "... Use a bulleted list.", ...);
* dialogsum, e2e_nlg, sql: TRAINING records only, from
  build_task_data.py's own splits (``--task-seed`` must be the seed the task
  data is built with, 0 by default, so its dev/test dialogues, MRs and
  databases are left out), in the task's eval wording and in an alternative
  wording;
* gsm8k: train.jsonl (the only GSM8K file in ../shared; the official test
  split is not there);
* ``*-multi``: two-turn conversations: a task prompt, its reference answer
  from the data as the first assistant turn, and a follow-up request;
* chat-followup (``--chat-followup N``, off by default): two-turn chats whose
  first assistant turn is the model's OWN distilled answer to a chat request,
  read from a corpus (``--answers CORPUS --answers-prompts PROMPTS``, the
  prompt file it was distilled from; ``--model`` gives the tokenizer), then a
  chat follow-up ("Can you give me an example?", ...). Only answers that
  ended by themselves (EOS) are used.

``--exclude FILE`` drops records equal to one of FILE's (a chat-heavy set kept
disjoint from an earlier prompt set); ``--held-out FILE`` drops every record
whose first user turn is the first user turn of one of FILE's.

Prompts equal to one of benchmarks/chat_prompts.jsonl (held out) are dropped.
Each record gets a ``max_tokens`` drawn from ``--lengths`` with
``--length-weights`` (varied answer lengths) and a ``source`` label. The file
is shuffled, so any prefix of it (and of the corpus distilled from it) mixes
all sources. The output depends only on the input files and the seeds;
PROMPTS.recipe.json beside it records the command, seeds, counts and the
SHA-256 of every input file and script. Files are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_task_data as tasks  # noqa: E402
from build_chat_mix import chat_prompts  # noqa: E402
from chat_requests import assistant_prompts  # noqa: E402

DEFAULT_OUT = Path("~/.cache/specstream-mlx/distill/prompts.jsonl")
BENCH_PROMPTS = HERE.parent / "benchmarks" / "chat_prompts.jsonl"

#: Default number of prompts per source (about 11.6k in all).
COUNTS = {
    "chat": 10_000,            # all of them (about 530)
    "chat-styled": 2,          # restyled copies per chat request
    "dialogsum": 1800, "dialogsum-alt": 600, "dialogsum-multi": 700,
    "gsm8k": 1900, "gsm8k-alt": 500, "gsm8k-multi": 600,
    "e2e_nlg": 383, "e2e_nlg-alt": 383, "e2e_nlg-multi": 400,
    "sql": 1500, "sql-alt": 500, "sql-multi": 500,
    "chat-followup": 0,        # needs --answers (the model's own first answers)
}
CHAT_SOURCES = ("chat", "chat-styled")

CHAT_STYLES = [
    "{p} Keep it short.", "{p} Please answer in detail.", "{p} Use a bulleted list.",
    "{p} Answer in two or three sentences.", "Hi! {p}", "Quick question: {p}",
    "{p} Explain your reasoning.", "Could you help me? {p}",
]
DIALOGSUM_ALT = [
    "Summarize this conversation in one sentence.", "What are the speakers talking about?",
    "Read the conversation and list its key points.",
    "Who is talking in this conversation, and what does each person want?",
]
GSM8K_ALT = ["{q}\nThink step by step.", "Solve this problem: {q}",
             "{q}\nExplain your answer.", "Can you help me with this math problem? {q}"]
E2E_ALT = [
    "Write one sentence describing a restaurant with these attributes: {mr}",
    "Write a short, friendly advert for a restaurant with these attributes: {mr}",
    "Describe this restaurant for a travel guide: {mr}",
]
SQL_ALT = ["Write an SQL query that answers: {q}",
           "How would I answer this question with SQL? {q}"]
FOLLOW_UPS = {
    "dialogsum": [
        "Make the summary shorter: one sentence.", "What is the main topic of this conversation?",
        "Rewrite the summary as a list of bullet points.",
        "What does each person want in this conversation?",
        "Write a short message the second speaker could send afterwards.",
        "What might happen next?", "Thanks! Can you explain that in simpler words?",
    ],
    "gsm8k": [
        "Can you explain the second step more simply?", "Check the answer in a different way.",
        "Write a similar problem with different numbers and solve it.",
        "Explain the solution to a ten-year-old.", "What if all the numbers were doubled?",
        "Thanks! Can you make the explanation shorter?",
    ],
    "sql": [
        "Explain what this query does in plain English.",
        "Rewrite the query so that the results are sorted.", "Explain each clause of the query.",
        "Is there another way to write this query?",
        "How would you change it to return only the first five rows?",
    ],
    "chat": [
        "Can you give me an example?", "Can you make that shorter?",
        "Thanks! Can you explain that more simply?", "Tell me more about the first point.",
        "Why is that?", "What mistakes should I avoid?", "Can you put that in a list?",
        "What would you recommend for a complete beginner?", "Is there anything else I should know?",
        "Can you summarize that in one sentence?", "How long does that usually take?",
        "Could you explain it to a ten-year-old?",
    ],
    "e2e_nlg": [
        "Rewrite it in a more formal tone.", "Now write a short advert for this restaurant.",
        "Write a two-sentence review of this restaurant as a customer.", "Make it shorter.",
        "Would this restaurant suit a family with young children? Why?",
    ],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gsm8k_solution(answer: str) -> str:
    """A GSM8K answer without calculator annotations, ending "The answer is N."."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?####\s*(.+)\s*$", r"\nThe answer is \1.", text).strip()


def _take(pool: List, count: int, seed: int, source: str) -> List:
    """A seeded sample of ``count`` items of ``pool`` (all of them, shuffled, if fewer)."""
    rng = random.Random(f"{seed}:{source}")
    return rng.sample(pool, min(count, len(pool)))


def _choose(options: List[str], seed: int, source: str, index: int) -> str:
    return random.Random(f"{seed}:{source}:{index}").choice(options)


def _held_out_chat() -> set:
    if not BENCH_PROMPTS.is_file():
        return set()
    return {json.loads(line)["prompt"] for line in BENCH_PROMPTS.read_text().splitlines()
            if line.strip()}


def _messages(record: dict) -> List[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}]


def _read_records(path: Path) -> List[dict]:
    path = path.expanduser()
    if not path.is_file():
        raise tasks.TaskDataError(f"{path} does not exist: give a prompt file this script wrote")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except json.JSONDecodeError as exc:
        raise tasks.TaskDataError(f"{path} is not JSONL ({exc})") from None


def chat_exchanges(corpus: Path, prompts: Path, tokenizer) -> List[tuple]:
    """``[(request, answer)]``: the chat requests of ``prompts`` that ``corpus``
    (distilled from ``prompts``) answers, with the model's own answer text.

    A corpus record is matched to its prompt by its prompt tokens (the same
    key as ``distill``'s resume). Answers cut by their ``max_tokens`` are
    skipped (the corpus stores no EOS: an answer shorter than its cap ended by
    itself): a follow-up to an unfinished answer is not a chat.
    """
    from specstream_mlx.train.distill import prompt_key, read_prompts

    records = _read_records(prompts)
    read = read_prompts(prompts, tokenizer)
    by_key = {}
    for p, record in zip(read, records):
        if record.get("source") in CHAT_SOURCES and "prompt" in record:
            by_key.setdefault(p.key, record["prompt"])
    pairs = []
    for line in _read_records(corpus):
        tokens, start = line["tokens"], line["loss_start"]
        request = by_key.get(prompt_key(tokens[:start]))
        answer = tokens[start:]
        if request is None or not answer or len(answer) >= line.get("max_tokens", 0):
            continue
        text = tokenizer.decode(answer).strip()
        if text:
            pairs.append((request, text))
    return pairs


def build(shared: Path, seed: int, task_seed: int, counts: Dict[str, int],
          exchanges: Optional[List[tuple]] = None):
    """``(entries, inputs)``: ``entries`` are ``(source, messages)`` pairs, ``inputs``
    the files read. ``exchanges`` (``chat_exchanges``) feed chat-followup."""
    entries = []
    inputs: List[Path] = []

    def add(source: str, messages: List[dict]) -> None:
        entries.append((source, messages))

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    def exchange(prompt: str, reply: str, follow_up: str) -> List[dict]:
        return [user(prompt), {"role": "assistant", "content": reply}, user(follow_up)]

    # Chat requests.
    requests = list(dict.fromkeys(chat_prompts() + assistant_prompts()))
    for i, text in enumerate(_take(requests, counts["chat"], seed, "chat")):
        add("chat", [user(text)])
    styled = [(text, k) for text in requests for k in range(counts["chat-styled"])]
    for i, (text, k) in enumerate(styled):
        styles = random.Random(f"{seed}:chat-styled:{text}").sample(CHAT_STYLES, len(CHAT_STYLES))
        add("chat-styled", [user(styles[k % len(styles)].format(p=text))])
    if counts["chat-followup"] and not exchanges:
        raise tasks.TaskDataError("--chat-followup needs the model's own answers: give --answers "
                                  "CORPUS --answers-prompts PROMPTS (a distilled corpus with chat)")
    pool = [(i, f) for i in range(len(exchanges or [])) for f in range(len(FOLLOW_UPS["chat"]))]
    for i, f in _take(pool, counts["chat-followup"], seed, "chat-followup"):
        request, answer = exchanges[i]
        add("chat-followup", exchange(request, answer, FOLLOW_UPS["chat"][f]))

    # DialogSum: training records of build_task_data (dev/test dialogues left out).
    folder = tasks._datasets(shared, "dialogsum")
    inputs += [folder / "dialogsum.train.jsonl", folder / "dialogsum.dev.jsonl"]
    train, _, _, _ = tasks.build_dialogsum(folder, task_seed, None)
    head = tasks.DIALOGSUM_INSTRUCTION + "\n\n"
    for r in _take(train, counts["dialogsum"], seed, "dialogsum"):
        add("dialogsum", [user(r["prompt"])])
    for i, r in enumerate(_take(train, counts["dialogsum-alt"], seed, "dialogsum-alt")):
        dialogue = r["prompt"][len(head):]
        add("dialogsum-alt", [user(f"{_choose(DIALOGSUM_ALT, seed, 'dialogsum-alt', i)}"
                                   f"\n\n{dialogue}")])
    for i, r in enumerate(_take(train, counts["dialogsum-multi"], seed, "dialogsum-multi")):
        add("dialogsum-multi", exchange(r["prompt"], r["completion"],
                                        _choose(FOLLOW_UPS["dialogsum"], seed, "dsm", i)))

    # GSM8K: the train file (all of it is training data).
    folder = tasks._datasets(shared, "gsm8k")
    inputs.append(folder / "train.jsonl")
    rows = tasks.read_jsonl(folder / "train.jsonl")
    for r in _take(rows, counts["gsm8k"], seed, "gsm8k"):
        add("gsm8k", [user(r["question"])])
    for i, r in enumerate(_take(rows, counts["gsm8k-alt"], seed, "gsm8k-alt")):
        add("gsm8k-alt", [user(_choose(GSM8K_ALT, seed, "gsm8k-alt", i).format(q=r["question"]))])
    for i, r in enumerate(_take(rows, counts["gsm8k-multi"], seed, "gsm8k-multi")):
        add("gsm8k-multi", exchange(r["question"], gsm8k_solution(r["answer"]),
                                    _choose(FOLLOW_UPS["gsm8k"], seed, "gsm", i)))

    # E2E: training MRs of build_task_data (dev/test MRs left out).
    folder = tasks._datasets(shared, "e2e_nlg")
    inputs.append(folder / "devset.csv")
    train, _, _, _ = tasks.build_e2e(folder, task_seed)
    mr_head = tasks.E2E_INSTRUCTION + "\n\n"
    mrs = sorted({r["prompt"][len(mr_head):] for r in train})
    for mr in _take(mrs, counts["e2e_nlg"], seed, "e2e_nlg"):
        add("e2e_nlg", [user(tasks.e2e_prompt(mr))])
    for i, mr in enumerate(_take(mrs, counts["e2e_nlg-alt"], seed, "e2e_nlg-alt")):
        add("e2e_nlg-alt", [user(_choose(E2E_ALT, seed, "e2e_nlg-alt", i).format(mr=mr))])
    for i, r in enumerate(_take(train, counts["e2e_nlg-multi"], seed, "e2e_nlg-multi")):
        add("e2e_nlg-multi", exchange(r["prompt"], r["completion"],
                                      _choose(FOLLOW_UPS["e2e_nlg"], seed, "e2m", i)))

    # SQL: training databases of build_task_data (dev/test databases left out).
    folder = tasks._datasets(shared, "spider")
    inputs += [folder / "train_spider.slim.json", folder / "tables.json"]
    train, _, _, _ = tasks.build_sql(folder, task_seed)
    for r in _take(train, counts["sql"], seed, "sql"):
        add("sql", [user(r["prompt"])])
    for i, r in enumerate(_take(train, counts["sql-alt"], seed, "sql-alt")):
        question = r["prompt"].rpartition("\n\nQuestion: ")[2]
        add("sql-alt", [user(_choose(SQL_ALT, seed, "sql-alt", i).format(q=question))])
    for i, r in enumerate(_take(train, counts["sql-multi"], seed, "sql-multi")):
        add("sql-multi", exchange(r["prompt"], r["completion"],
                                  _choose(FOLLOW_UPS["sql"], seed, "sqm", i)))
    return entries, inputs


def records(entries, seed: int, lengths: List[int], weights: List[float],
            exclude: Optional[List[List[dict]]] = None, held_out_first: Optional[set] = None):
    """``(records, counts)``: deduplicated, held-out chat prompts dropped, shuffled, each
    with ``max_tokens`` and ``source``. Entries equal to one of ``exclude`` and
    entries whose first user turn is in ``held_out_first`` are dropped too."""
    held_out = _held_out_chat()
    excluded = {json.dumps(m, sort_keys=True) for m in exclude or []}
    seen, kept = set(), []
    dropped = {"duplicate": 0, "held_out": 0, "excluded": 0}
    for source, messages in entries:
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        if (any(m["role"] == "user" and m["content"] in held_out for m in messages)
                or messages[0]["content"] in (held_out_first or ())):
            dropped["held_out"] += 1
            continue
        if key in excluded:
            dropped["excluded"] += 1
            continue
        seen.add(key)
        kept.append((source, messages))
    rng = random.Random(f"{seed}:order")
    rng.shuffle(kept)
    caps = random.Random(f"{seed}:max_tokens").choices(lengths, weights=weights, k=len(kept))
    out, counts = [], {}
    for (source, messages), cap in zip(kept, caps):
        record = ({"prompt": messages[0]["content"]} if len(messages) == 1
                  else {"messages": messages})
        record.update(max_tokens=cap, source=source)
        out.append(record)
        counts[source] = counts.get(source, 0) + 1
    return out, counts, dropped


def _tokenizer(model: Optional[str]):
    """The tokenizer of ``model`` (default: the default model), as distill encodes with."""
    sys.path.insert(0, str(HERE.parent))
    from mlx_lm.utils import load_tokenizer
    from specstream_mlx.cli.app import model_or_default
    from specstream_mlx.loading import resolve_path

    return load_tokenizer(Path(resolve_path(model_or_default(model))))


def _ints(text: str, name: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise tasks.TaskDataError(f"{name} takes comma-separated positive integers, got {text!r}")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"),
                        help="../shared (or ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="sampling, lengths and order")
    parser.add_argument("--task-seed", type=int, default=0,
                        help="build_task_data.py's --seed (its dev/test parts are left out)")
    parser.add_argument("--lengths", default="64,128,256", help="max_tokens values")
    parser.add_argument("--length-weights", default="1,2,1", help="their relative frequencies")
    for source, count in COUNTS.items():
        parser.add_argument(f"--{source}", type=int, default=count, dest=source.replace("-", "_"),
                            help=f"prompts of source {source} (default {count})"
                            if source != "chat-styled" else "restyled copies per chat request")
    parser.add_argument("--answers", type=Path, help="chat-followup: a distilled corpus")
    parser.add_argument("--answers-prompts", type=Path, help="the prompt file --answers was distilled from")
    parser.add_argument("--model", default=None, help="chat-followup: the tokenizer's model "
                        "(default: the default model)")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="drop records equal to one of this prompt file's (repeatable)")
    parser.add_argument("--held-out", type=Path, action="append", default=[],
                        help="drop records whose first user turn is one of this file's (repeatable)")
    args = parser.parse_args(argv)
    counts = {source: getattr(args, source.replace("-", "_")) for source in COUNTS}
    try:
        lengths = _ints(args.lengths, "--lengths")
        weights = _ints(args.length_weights, "--length-weights")
        if len(weights) != len(lengths):
            raise tasks.TaskDataError("--length-weights needs one weight per --lengths value")
        if any(c < 0 for c in counts.values()):
            raise tasks.TaskDataError("counts must not be negative")
        exchanges = None
        if (args.answers is None) != (args.answers_prompts is None):
            raise tasks.TaskDataError("--answers and --answers-prompts go together")
        if args.answers is not None:
            exchanges = chat_exchanges(args.answers, args.answers_prompts, _tokenizer(args.model))
            print(f"{len(exchanges)} finished chat answers in {args.answers}")
        exclude = [_messages(r) for path in args.exclude for r in _read_records(path)]
        held_out_first = {_messages(r)[0]["content"] for path in args.held_out
                          for r in _read_records(path)}
        entries, inputs = build(args.shared, args.seed, args.task_seed, counts, exchanges)
        inputs += [p for p in [args.answers, args.answers_prompts] + args.exclude + args.held_out if p]
        out_records, made, dropped = records(entries, args.seed, lengths, weights,
                                             exclude, held_out_first)
    except tasks.TaskDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out.expanduser()
    tasks.write_jsonl(out, out_records)
    scripts = [HERE / n for n in ("build_distill_prompts.py", "build_task_data.py",
                                  "build_chat_mix.py", "chat_requests.py")]
    recipe = {
        "command": ["python", "scripts/build_distill_prompts.py"] + list(
            sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "task_seed": args.task_seed,
        "lengths": lengths, "length_weights": weights,
        "requested": counts, "written": made, "total": len(out_records), "dropped": dropped,
        "inputs": {str(p.resolve()): sha256(p) for p in inputs},
        "held_out_chat_prompts": {str(BENCH_PROMPTS): sha256(BENCH_PROMPTS)}
        if BENCH_PROMPTS.is_file() else {},
        "scripts": {p.name: sha256(p) for p in scripts},
        "output_sha256": sha256(out),
    }
    tasks.write_text(out.with_name(out.stem + ".recipe.json"), json.dumps(recipe, indent=2) + "\n")
    width = max(len(s) for s in made) if made else 0
    for source in COUNTS:
        if source in made:
            print(f"  {source:<{width}}  {made[source]:6d}")
    print(f"wrote {len(out_records)} prompts to {out} ({dropped['duplicate']} duplicates, "
          f"{dropped['held_out']} held-out and {dropped['excluded']} excluded prompts dropped; recipe in "
          f"{out.with_name(out.stem + '.recipe.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
