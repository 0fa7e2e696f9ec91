"""Task data (train / dev / test) for training and `specstream-mlx eval`, from ../shared/datasets.

Usage:
  python scripts/build_task_data.py TASK --shared ../shared --out DIR [--seed 0] [--train N]
  python scripts/build_task_data.py TASK --raw FILE [--tables FILE] --out FILE.jsonl

TASK is dialogsum, e2e_nlg or sql (``spider`` is an alias of ``sql``).

Normal mode writes DIR/train.jsonl, dev.jsonl and test.jsonl (plus
valid.jsonl, a copy of dev.jsonl under the name mlx-lm's ``lora`` and
``specstream-mlx train --val-data DIR`` look for, and meta.json: seed, sizes,
held-out MRs / databases). The three splits are disjoint and the output
depends only on the input files and ``--seed``. Use dev.jsonl for every
choice (steps, trees, prompts) and test.jsonl only for figures you report.

Records are mlx-lm's prompt/completion objects (the chat template is applied
at load, by ``specstream_mlx.records``). Eval records with several reference
texts also carry ``"references"`` (all of them; ``completion`` is the first),
scored as the best over the references.

* dialogsum: "Summarize the following dialogue." + dialogue -> summary.
  train: dialogsum.train.jsonl (optionally only dialogues under
  ``--max-chars`` characters); dev: the FIRST 250 lines of
  dialogsum.dev.jsonl, test: the LAST 250 (file order; disjoint halves).
* e2e_nlg: meaning representation -> sentence, from devset.csv, split BY MR
  (seeded shuffle of the sorted distinct MRs: 70% train, 15% dev, 15% test).
  train: one record per (MR, reference); dev/test: one record per MR with
  all its references.
* sql (sql-create-context style): the question + ``CREATE TABLE`` statements
  of only the tables the gold query uses (table names matched in the query,
  case-insensitive, on word boundaries, outside string literals; column types
  from tables.json's ``column_types``) -> the query. Split BY DATABASE
  (seeded shuffle of the sorted db_ids: 80% train, 10% dev, 10% test).
  Some databases share tables, so a dev/test prompt can equal a training
  prompt word for word: those dev/test records are dropped (meta.json counts
  them; any task).

Raw mode builds ONE eval set from an upstream split file in the shared files'
format: DialogSum jsonl (``summary`` or ``summary1``..``summary3``: all are
references), E2E csv (``mr``, ``ref``; grouped by MR), Spider json (a list of
objects with ``question``, ``query``, ``db_id``; other fields are ignored;
needs ``--tables``). Bad input (a missing file, column or field, an unknown
db_id) ends with one ``error:`` line and exit code 2. Files are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from specstream_mlx.atomic import atomic_write_text

DIALOGSUM_INSTRUCTION = "Summarize the following dialogue."
E2E_INSTRUCTION = ("Write a description of the restaurant from this meaning representation "
                   "(attribute[value] pairs).")
SQL_INSTRUCTION = "Write one SQL query that answers the question, using these tables."
DIALOGSUM_DEV = 250          # dev: the first 250 lines of dialogsum.dev.jsonl, test: the rest
E2E_FRACTIONS = (0.15, 0.15)  # dev, test shares of the MRs
SQL_FRACTIONS = (0.10, 0.10)  # dev, test shares of the databases
SQL_TYPES = {"number": "INTEGER", "text": "VARCHAR", "time": "DATETIME",
             "boolean": "BOOLEAN", "others": "VARCHAR"}

Record = Dict[str, object]


class TaskDataError(Exception):
    """Bad input: reported as one error line, exit code 2."""


# ---------------------------------------------------------------- reading

def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    return path


def read_jsonl(path: Path) -> List[dict]:
    rows = []
    with open(_need_file(path), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{number}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise TaskDataError(f"{path}: holds no records")
    return rows


def read_json_list(path: Path) -> List[dict]:
    try:
        with open(_need_file(path), encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TaskDataError(f"{path}: expected a non-empty JSON list of objects")
    return rows


def read_csv(path: Path, columns: Iterable[str]) -> List[dict]:
    with open(_need_file(path), encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise TaskDataError(f"{path}: missing column {', '.join(missing)} "
                                f"(header: {', '.join(reader.fieldnames or []) or 'none'})")
        rows = list(reader)
    if not rows:
        raise TaskDataError(f"{path}: holds no rows")
    return rows


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise TaskDataError(f"{where}: missing field {name!r} (a non-empty string)")
    return value


# ---------------------------------------------------------------- records

def _record(prompt: str, references: List[str], multi: bool) -> Record:
    """A prompt/completion record; ``multi``: add ``references`` (all of them)."""
    record: Record = {"prompt": prompt, "completion": references[0]}
    if multi:
        record["references"] = list(references)
    return record


def dialogsum_record(row: dict, where: str) -> Record:
    """One DialogSum row; ``summary1``.. (test split) become references."""
    dialogue = _field(row, "dialogue", where)
    prompt = f"{DIALOGSUM_INSTRUCTION}\n\n{dialogue}"
    numbered = sorted((k for k in row if re.fullmatch(r"summary\d+", k)), key=lambda k: int(k[7:]))
    if numbered:
        refs = [_field(row, k, where) for k in numbered]
        return _record(prompt, refs, multi=True)
    return _record(prompt, [_field(row, "summary", where)], multi=False)


def e2e_prompt(mr: str) -> str:
    return f"{E2E_INSTRUCTION}\n\n{mr}"


def e2e_groups(rows: List[dict], path: Path) -> Dict[str, List[str]]:
    """MR -> its references in file order (rows numbered as in the csv, header = line 1)."""
    groups: Dict[str, List[str]] = {}
    for number, row in enumerate(rows, start=2):
        where = f"{path}:{number}"
        mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
        if not mr or not ref:
            raise TaskDataError(f"{where}: empty {'mr' if not mr else 'ref'}")
        groups.setdefault(mr, []).append(ref)
    return groups


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else '"' + name.replace('"', '""') + '"'


class Schemas:
    """tables.json: per database, its tables' CREATE TABLE statements."""

    def __init__(self, path: Path):
        self.path = path
        self.tables: Dict[str, List[Tuple[str, str]]] = {}  # db_id -> [(table, CREATE ...)]
        for i, db in enumerate(read_json_list(path)):
            where = f"{path}: database {i}"
            try:
                db_id, names = db["db_id"], db["table_names_original"]
                columns, types = db["column_names_original"], db["column_types"]
            except KeyError as exc:
                raise TaskDataError(f"{where}: missing field {exc.args[0]!r}") from None
            if len(columns) != len(types):
                raise TaskDataError(f"{where} ({db_id}): column_types and column_names_original "
                                    f"differ in length")
            per_table: List[List[str]] = [[] for _ in names]
            for (owner, column), kind in zip(columns, types):
                if owner >= 0:
                    per_table[owner].append(f"{_quote(column)} {SQL_TYPES.get(kind, 'VARCHAR')}")
            self.tables[db_id] = [(name, f"CREATE TABLE {_quote(name)} ({', '.join(cols)})")
                                  for name, cols in zip(names, per_table)]

    def context(self, db_id: str, query: str, where: str) -> str:
        """CREATE TABLE statements of the tables ``query`` uses (all if none is found)."""
        if db_id not in self.tables:
            raise TaskDataError(f"{where}: unknown db_id {db_id!r} (not in {self.path})")
        tables = self.tables[db_id]
        used = [create for name, create in tables if uses_table(query, name)]
        return "\n".join(used or [create for _, create in tables])


def uses_table(query: str, table: str) -> bool:
    """Does ``query`` name ``table`` (case-insensitive, whole word, outside string literals)?"""
    code = re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", " ", query)
    return re.search(rf"(?<![\w.]){re.escape(table)}(?!\w)", code, re.IGNORECASE) is not None


def sql_record(row: dict, schemas: Schemas, where: str) -> Record:
    question, query = _field(row, "question", where), _field(row, "query", where)
    db_id = _field(row, "db_id", where)
    context = schemas.context(db_id, query, where)
    prompt = f"{SQL_INSTRUCTION}\n\n{context}\n\nQuestion: {question}"
    return _record(prompt, [query], multi=False)


# ---------------------------------------------------------------- splits

def _split_keys(keys: List[str], fractions: Tuple[float, float], seed: int):
    """Seeded (train, dev, test) sets of ``keys`` (sorted first: file order does not matter)."""
    keys = sorted(set(keys))
    random.Random(seed).shuffle(keys)
    n_dev, n_test = (max(1, round(f * len(keys))) for f in fractions)
    if n_dev + n_test >= len(keys):
        raise TaskDataError(f"only {len(keys)} groups: too few to split into train/dev/test")
    return (set(keys[n_dev + n_test:]), set(keys[:n_dev]), set(keys[n_dev:n_dev + n_test]))


def _shuffled(records: List[Record], seed: int) -> List[Record]:
    records = list(records)
    random.Random(seed).shuffle(records)
    return records


def build_dialogsum(folder: Path, seed: int, max_chars: Optional[int]):
    train_path, dev_path = folder / "dialogsum.train.jsonl", folder / "dialogsum.dev.jsonl"
    train_rows, dev_rows = read_jsonl(train_path), read_jsonl(dev_path)
    if len(dev_rows) < 2:
        raise TaskDataError(f"{dev_path}: too few lines to split into dev and test")
    half = min(DIALOGSUM_DEV, len(dev_rows) // 2)
    held_out = {r.get("dialogue") for r in dev_rows}
    train = [dialogsum_record(r, f"{train_path}:{i}") for i, r in enumerate(train_rows, start=1)
             if (max_chars is None or len(r.get("dialogue", "")) < max_chars)
             and r.get("dialogue") not in held_out]
    dev = [dialogsum_record(r, f"{dev_path}:{i}") for i, r in enumerate(dev_rows[:half], start=1)]
    test = [dialogsum_record(r, f"{dev_path}:{i}")
            for i, r in enumerate(dev_rows[len(dev_rows) - half:], start=len(dev_rows) - half + 1)]
    meta = {"dev": f"{dev_path.name} lines 1-{half}",
            "test": f"{dev_path.name} lines {len(dev_rows) - half + 1}-{len(dev_rows)}",
            "max_chars": max_chars}
    return _shuffled(train, seed), dev, test, meta


def build_e2e(folder: Path, seed: int):
    path = folder / "devset.csv"
    groups = e2e_groups(read_csv(path, ("mr", "ref")), path)
    train_mrs, dev_mrs, test_mrs = _split_keys(list(groups), E2E_FRACTIONS, seed)
    train = [_record(e2e_prompt(mr), [ref], multi=False)
             for mr in sorted(train_mrs) for ref in groups[mr]]
    dev = [_record(e2e_prompt(mr), groups[mr], multi=True) for mr in sorted(dev_mrs)]
    test = [_record(e2e_prompt(mr), groups[mr], multi=True) for mr in sorted(test_mrs)]
    meta = {"mrs": {"train": len(train_mrs), "dev": len(dev_mrs), "test": len(test_mrs)}}
    return _shuffled(train, seed), _shuffled(dev, seed + 1), _shuffled(test, seed + 2), meta


def build_sql(folder: Path, seed: int):
    path = folder / "train_spider.slim.json"
    schemas = Schemas(folder / "tables.json")
    rows = read_json_list(path)
    where = [f"{path}: item {i}" for i in range(len(rows))]
    dbs = [_field(r, "db_id", w) for r, w in zip(rows, where)]
    train_dbs, dev_dbs, test_dbs = _split_keys(dbs, SQL_FRACTIONS, seed)
    splits = {}
    for name, chosen in (("train", train_dbs), ("dev", dev_dbs), ("test", test_dbs)):
        splits[name] = [sql_record(r, schemas, w) for r, w, db in zip(rows, where, dbs)
                        if db in chosen]
    meta = {"databases": {"train": len(train_dbs), "dev": sorted(dev_dbs),
                          "test": sorted(test_dbs)}}
    return (_shuffled(splits["train"], seed), _shuffled(splits["dev"], seed + 1),
            _shuffled(splits["test"], seed + 2), meta)


def build_raw(task: str, raw: Path, tables: Optional[Path]) -> List[Record]:
    """One eval set from an upstream split file (file order; E2E: order of first appearance)."""
    if task == "dialogsum":
        return [dialogsum_record(r, f"{raw}:{i}") for i, r in enumerate(read_jsonl(raw), start=1)]
    if task == "e2e_nlg":
        groups = e2e_groups(read_csv(raw, ("mr", "ref")), raw)
        return [_record(e2e_prompt(mr), refs, multi=True) for mr, refs in groups.items()]
    if tables is None:
        raise TaskDataError("sql --raw needs --tables FILE (Spider's tables.json)")
    schemas = Schemas(tables)
    return [sql_record(r, schemas, f"{raw}: item {i}") for i, r in enumerate(read_json_list(raw))]


# ---------------------------------------------------------------- writing

def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    """Write ``records`` to ``path`` atomically, one JSON object a line."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary sibling, then rename)."""
    atomic_write_text(path, text)


def _datasets(shared: Path, task_dir: str) -> Path:
    """The task's folder under ``shared`` (``../shared`` or ``../shared/datasets``)."""
    for folder in (shared / "datasets" / task_dir, shared / task_dir):
        if folder.is_dir():
            return folder
    raise TaskDataError(f"{shared}: no datasets/{task_dir} folder (pass the path of ../shared)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="normal mode: --shared DIR --out DIR; raw mode: --raw FILE [--tables FILE] "
               "--out FILE.jsonl")
    parser.add_argument("task", choices=["dialogsum", "e2e_nlg", "sql", "spider"],
                        help="spider: alias of sql")
    parser.add_argument("--shared", type=Path, help="../shared (or ../shared/datasets)")
    parser.add_argument("--raw", type=Path, help="one upstream split file -> one eval set")
    parser.add_argument("--tables", type=Path, help="sql --raw: Spider's tables.json")
    parser.add_argument("--out", type=Path, required=True,
                        help="normal mode: a folder; raw mode: a .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=0,
                        help="keep only N training records (seeded sample; 0: all)")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="dialogsum: train only on dialogues under N characters")
    args = parser.parse_args(argv)
    task = "sql" if args.task == "spider" else args.task
    if (args.raw is None) == (args.shared is None):
        parser.error("give either --shared DIR (train/dev/test) or --raw FILE (one eval set)")
    try:
        if args.raw is not None:
            records = build_raw(task, args.raw, args.tables)
            write_jsonl(args.out, records)
            print(f"{task}: {len(records)} eval records from {args.raw} in {args.out}")
            return 0
        folder = _datasets(args.shared, {"sql": "spider"}.get(task, task))
        if task == "dialogsum":
            train, dev, test, meta = build_dialogsum(folder, args.seed, args.max_chars)
        elif task == "e2e_nlg":
            train, dev, test, meta = build_e2e(folder, args.seed)
        else:
            train, dev, test, meta = build_sql(folder, args.seed)
    except TaskDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Spider reuses tables across databases: a dev/test prompt may equal a training
    # prompt (same question and CREATE TABLE text). Such records are dropped.
    seen = {r["prompt"] for r in train}
    dropped = {"dev": sum(r["prompt"] in seen for r in dev),
               "test": sum(r["prompt"] in seen for r in test)}
    dev = [r for r in dev if r["prompt"] not in seen]
    test = [r for r in test if r["prompt"] not in seen]
    if args.train:
        train = train[:args.train]
    sizes = {"train": len(train), "dev": len(dev), "test": len(test)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("dev", dev), ("valid", dev), ("test", test)):
        write_jsonl(args.out / f"{name}.jsonl", records)
    meta = {"task": task, "seed": args.seed, "source": str(folder.resolve()), "sizes": sizes,
            "dropped_as_seen_in_train": dropped, **meta}
    write_text(args.out / "meta.json", json.dumps(meta, indent=2) + "\n")
    print(f"{task}: {sizes['train']} train, {sizes['dev']} dev, {sizes['test']} test records "
          f"in {args.out} (valid.jsonl = dev.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
