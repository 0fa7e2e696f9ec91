"""Task data for shared-mode training and `specstream-mlx eval`, from ../shared/datasets.

Usage: python scripts/build_task_data.py {dialogsum,spider} SHARED_DIR OUT_DIR [--train N] [--test N]

Writes OUT_DIR/train.jsonl, valid.jsonl and test.jsonl as prompt/completion
records (mlx-lm's format; the chat template is applied at load).

* dialogsum: "Summarize the following dialogue." + dialogue -> summary;
  train: N dialogues under 900 characters (seeded sample); valid/test: the
  first dev dialogues.
* spider: the database schema as `table(column, ...)` lines + question ->
  SQL. Train and test come from different databases (every 10th database
  is held out), so test scores SQL on schemas the model never saw.
"""

import argparse
import json
import random
from pathlib import Path


def _write(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, completion in records:
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def dialogsum(shared: Path, train_size: int, test_size: int):
    folder = shared / "datasets" / "dialogsum"
    rows = [json.loads(line) for line in open(folder / "dialogsum.train.jsonl", encoding="utf-8")]
    dev = [json.loads(line) for line in open(folder / "dialogsum.dev.jsonl", encoding="utf-8")]

    def record(row):
        return f"Summarize the following dialogue.\n\n{row['dialogue']}", row["summary"]

    short = [r for r in rows if len(r["dialogue"]) < 900]
    train = [record(r) for r in random.Random(0).sample(short, min(train_size, len(short)))]
    test = [record(r) for r in dev[:test_size]]
    return train, test


def spider(shared: Path, train_size: int, test_size: int):
    folder = shared / "datasets" / "spider"
    tables = {t["db_id"]: t for t in json.load(open(folder / "tables.json", encoding="utf-8"))}
    rows = json.load(open(folder / "train_spider.slim.json", encoding="utf-8"))

    def schema(db_id: str) -> str:
        table = tables[db_id]
        columns = {i: [] for i in range(len(table["table_names_original"]))}
        for owner, name in table["column_names_original"]:
            if owner >= 0:
                columns[owner].append(name)
        return "\n".join(f"{name}({', '.join(columns[i])})"
                         for i, name in enumerate(table["table_names_original"]))

    def record(row):
        prompt = (f"Database schema:\n{schema(row['db_id'])}\n\n"
                  f"Write one SQLite query that answers: {row['question']}")
        return prompt, row["query"]

    databases = sorted({r["db_id"] for r in rows})
    held_out = set(databases[::10])
    train = [record(r) for r in rows if r["db_id"] not in held_out]
    test = [record(r) for r in rows if r["db_id"] in held_out]
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    return train[:train_size], test[:test_size]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["dialogsum", "spider"])
    parser.add_argument("shared", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=40)
    args = parser.parse_args()
    if not (args.shared / "datasets").is_dir():
        parser.error(f"{args.shared} has no datasets/ folder: pass the path of ../shared")
    train, test = {"dialogsum": dialogsum, "spider": spider}[args.task](
        args.shared, args.train, args.test)
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "train.jsonl", train)
    _write(args.out / "valid.jsonl", test)
    _write(args.out / "test.jsonl", test)
    print(f"{args.task}: {len(train)} train, {len(test)} test records in {args.out}")


if __name__ == "__main__":
    main()
