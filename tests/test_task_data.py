"""scripts/build_task_data.py: disjoint seeded splits, references, CREATE TABLE context, raw mode.

Every input is a tiny synthetic file written here (tests never read ../shared).
"""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specstream_mlx.records import read_records

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_task_data.py"
_spec = importlib.util.spec_from_file_location("build_task_data", SCRIPT)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def run(*args):
    """Run the script as the command line does: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- synthetic shared folders

def e2e_rows():
    """20 MRs with 1 to 3 references each, the rows of one MR not adjacent."""
    rows = []
    for k in range(3):
        for i in range(20):
            if k <= i % 3:
                rows.append((f"name[Place {i}], food[Dish {i}]", f"Place {i} serves dish {i}, version {k}."))
    return rows


def spider_tables():
    """10 databases; each has singer(singer_id, name, age), concert(concert_id, singer_id, year)
    and an unused venue table."""
    dbs = []
    for d in range(10):
        dbs.append({
            "db_id": f"db_{d}",
            "table_names_original": ["singer", "concert", "Venue"],
            "table_names": ["singer", "concert", "venue"],
            "column_names_original": [[-1, "*"], [0, "singer_id"], [0, "Name"], [0, "Age"],
                                      [1, "concert_id"], [1, "singer_id"], [1, "Year"],
                                      [1, "Start Time"], [2, "venue_id"], [2, "Open"]],
            "column_names": [], "column_types": ["text", "number", "text", "number", "number",
                                                 "number", "number", "time", "number", "boolean"],
            "foreign_keys": [], "primary_keys": [],
        })
    return dbs


def spider_rows():
    rows = []
    for d in range(10):
        rows.append({"question": f"How many singers in {d}?", "db_id": f"db_{d}",
                     "query": "SELECT count(*) FROM SINGER"})
        rows.append({"question": f"Names at concerts {d}?", "db_id": f"db_{d}",
                     "query": "SELECT T1.name FROM singer AS T1 JOIN Concert AS T2 "
                              "ON T1.singer_id = T2.singer_id"})
        rows.append({"question": f"Singer named venue {d}?", "db_id": f"db_{d}",
                     "query": "SELECT age FROM singer WHERE name = 'Venue'"})
        # the same question on the same table in every database: one prompt text
        rows.append({"question": "List all singers.", "db_id": f"db_{d}",
                     "query": "SELECT * FROM singer"})
    return rows


@pytest.fixture
def shared(tmp_path):
    root = tmp_path / "shared"
    data = root / "datasets"
    write_jsonl(data / "dialogsum" / "dialogsum.train.jsonl",
                [{"dialogue": f"#P1#: train talk {i} " + "x" * (40 * i), "summary": f"train {i}",
                  "topic": "t"} for i in range(6)])
    write_jsonl(data / "dialogsum" / "dialogsum.dev.jsonl",
                [{"dialogue": f"#P1#: dev talk {i}", "summary": f"dev {i}", "topic": "t"}
                 for i in range(8)])
    write_csv(data / "e2e_nlg" / "devset.csv", ["mr", "ref"], e2e_rows())
    (data / "spider").mkdir(parents=True)
    (data / "spider" / "tables.json").write_text(json.dumps(spider_tables()))
    (data / "spider" / "train_spider.slim.json").write_text(json.dumps(spider_rows()))
    return root


def build_task(shared, out, task, *extra):
    code, stdout, stderr = run(task, "--shared", shared, "--out", out, *extra)
    assert code == 0, stderr
    return {name: read(out / f"{name}.jsonl") for name in ("train", "dev", "valid", "test")}, stdout


# ---------------------------------------------------------------- normal mode

def test_dialogsum_dev_and_test_are_the_two_halves_of_the_dev_file(shared, tmp_path):
    splits, stdout = build_task(shared, tmp_path / "out", "dialogsum")
    assert "6 train, 4 dev, 4 test" in stdout
    assert [r["completion"] for r in splits["dev"]] == [f"dev {i}" for i in range(4)]
    assert [r["completion"] for r in splits["test"]] == [f"dev {i}" for i in range(4, 8)]
    assert sorted(r["completion"] for r in splits["train"]) == [f"train {i}" for i in range(6)]
    assert splits["valid"] == splits["dev"]
    assert splits["dev"][0]["prompt"] == "Summarize the following dialogue.\n\n#P1#: dev talk 0"
    # the length filter (old default: dialogues under 900 characters) is an option
    short, _ = build_task(shared, tmp_path / "short", "dialogsum", "--max-chars", 90)
    assert sorted(r["completion"] for r in short["train"]) == ["train 0", "train 1"]
    few, _ = build_task(shared, tmp_path / "few", "dialogsum", "--train", 3)
    assert len(few["train"]) == 3


def test_e2e_splits_by_mr_with_all_references_in_dev_and_test(shared, tmp_path):
    splits, stdout = build_task(shared, tmp_path / "out", "e2e_nlg", "--seed", 3)
    refs = {}
    for mr, ref in e2e_rows():
        refs.setdefault(mr, []).append(ref)
    mr_of = {build.e2e_prompt(mr): mr for mr in refs}
    mrs = {name: [mr_of[r["prompt"]] for r in records] for name, records in splits.items()}
    # 15% / 15% of 20 MRs; no MR in two splits; every MR somewhere
    assert len(mrs["dev"]) == len(mrs["test"]) == 3
    assert not set(mrs["train"]) & set(mrs["dev"]) and not set(mrs["train"]) & set(mrs["test"])
    assert not set(mrs["dev"]) & set(mrs["test"])
    assert set(mrs["train"]) | set(mrs["dev"]) | set(mrs["test"]) == set(refs)
    # train: one record per (MR, reference); dev/test: one record per MR, all references
    assert sorted((mr_of[r["prompt"]], r["completion"]) for r in splits["train"]) == sorted(
        (mr, ref) for mr in set(mrs["train"]) for ref in refs[mr])
    assert all("references" not in r for r in splits["train"])
    for record in splits["dev"] + splits["test"]:
        mr = mr_of[record["prompt"]]
        assert record["references"] == refs[mr] and record["completion"] == refs[mr][0]
    assert len(splits["dev"]) == len(set(mrs["dev"]))
    assert f"{len(splits['train'])} train, 3 dev, 3 test" in stdout
    # the records are read with their references by the one reader
    dev = read_records(str(tmp_path / "out" / "dev.jsonl"), need_completion=True)
    assert [r.references for r in dev] == [r["references"] for r in splits["dev"]]


def test_splits_are_seeded_and_deterministic(shared, tmp_path):
    first, _ = build_task(shared, tmp_path / "a", "e2e_nlg", "--seed", 1)
    again, _ = build_task(shared, tmp_path / "b", "e2e_nlg", "--seed", 1)
    other, _ = build_task(shared, tmp_path / "c", "e2e_nlg", "--seed", 2)
    assert first == again
    assert {r["prompt"] for r in first["test"]} != {r["prompt"] for r in other["test"]}
    sql_a, _ = build_task(shared, tmp_path / "d", "sql", "--seed", 5)
    sql_b, _ = build_task(shared, tmp_path / "e", "sql", "--seed", 5)
    assert sql_a == sql_b


def test_sql_splits_by_database_with_create_table_of_the_used_tables(shared, tmp_path):
    out = tmp_path / "out"
    splits, stdout = build_task(shared, out, "sql")
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["databases"]["dev"]) == len(meta["databases"]["test"]) == 1
    assert meta["databases"]["train"] == 8
    db_of = {f"{q['question']}": q["db_id"] for q in spider_rows() if q["question"][-2].isdigit()}
    dbs = {name: {db_of[q] for r in records if (q := r["prompt"].rsplit("Question: ", 1)[1]) in db_of}
           for name, records in splits.items()}
    assert dbs["dev"] == set(meta["databases"]["dev"]) and dbs["test"] == set(meta["databases"]["test"])
    assert not dbs["train"] & dbs["dev"] and not dbs["train"] & dbs["test"]
    assert not dbs["dev"] & dbs["test"] and len(dbs["train"]) == 8
    # a dev/test prompt equal to a training prompt (shared tables) is dropped
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (32, 3, 3)
    assert "32 train, 3 dev, 3 test" in stdout
    assert meta["dropped_as_seen_in_train"] == {"dev": 1, "test": 1}
    assert sum(r["completion"] == "SELECT * FROM singer" for r in splits["train"]) == 8
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["dev"] + splits["test"]}

    singer = "CREATE TABLE singer (singer_id INTEGER, Name VARCHAR, Age INTEGER)"
    concert = ('CREATE TABLE concert (concert_id INTEGER, singer_id INTEGER, Year INTEGER, '
               '"Start Time" DATETIME)')
    by_query = {}
    for record in splits["train"]:
        by_query.setdefault(record["completion"], record["prompt"])
    count = by_query["SELECT count(*) FROM SINGER"]
    assert count.startswith(build.SQL_INSTRUCTION + "\n\n" + singer + "\n\nQuestion: How many")
    assert "concert" not in count and "Venue" not in count
    join = by_query["SELECT T1.name FROM singer AS T1 JOIN Concert AS T2 "
                    "ON T1.singer_id = T2.singer_id"]
    assert f"{singer}\n{concert}\n\nQuestion:" in join and "Venue" not in join
    # a table's name inside a string literal is not a use of the table
    literal = by_query["SELECT age FROM singer WHERE name = 'Venue'"]
    assert "CREATE TABLE Venue" not in literal and singer in literal


def test_uses_table_matches_whole_words_case_insensitively():
    assert build.uses_table("SELECT * FROM Singer", "singer")
    assert build.uses_table("select x from a join SINGER_IN_CONCERT on 1", "singer_in_concert")
    assert not build.uses_table("SELECT singer_id FROM concert", "singer")
    assert not build.uses_table("SELECT T1.singer FROM concert AS T1", "singer")
    assert not build.uses_table('SELECT a FROM t WHERE b = "singer"', "singer")


def test_spider_is_an_alias_of_sql(shared, tmp_path):
    sql, _ = build_task(shared, tmp_path / "sql", "sql")
    spider, stdout = build_task(shared, tmp_path / "spider", "spider")
    assert sql == spider and stdout.startswith("sql:")


# ---------------------------------------------------------------- raw mode

def test_raw_dialogsum_test_split_uses_every_summary_as_a_reference(tmp_path):
    raw = write_jsonl(tmp_path / "test.jsonl", [
        {"fname": "test_0", "dialogue": "#P1#: hi", "summary1": "one", "summary2": "two",
         "summary3": "three", "topic1": "x"},
        {"fname": "test_1", "dialogue": "#P1#: bye", "summary": "only"}])
    out = tmp_path / "eval" / "dialogsum_test.jsonl"
    code, stdout, stderr = run("dialogsum", "--raw", raw, "--out", out)
    assert code == 0, stderr
    assert "2 eval records" in stdout
    first, second = read(out)
    assert first == {"prompt": "Summarize the following dialogue.\n\n#P1#: hi",
                     "completion": "one", "references": ["one", "two", "three"]}
    assert second["completion"] == "only" and "references" not in second
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary left


def test_raw_e2e_csv_is_grouped_by_mr(tmp_path):
    raw = write_csv(tmp_path / "testset_w_refs.csv", ["mr", "ref"],
                    [("name[A]", "A one."), ("name[B]", "B one."), ("name[A]", "A two.")])
    out = tmp_path / "e2e_test.jsonl"
    code, _, stderr = run("e2e_nlg", "--raw", raw, "--out", out)
    assert code == 0, stderr
    assert read(out) == [
        {"prompt": build.e2e_prompt("name[A]"), "completion": "A one.",
         "references": ["A one.", "A two."]},
        {"prompt": build.e2e_prompt("name[B]"), "completion": "B one.", "references": ["B one."]}]


def test_raw_spider_dev_json_ignores_extra_fields_and_needs_tables(tmp_path):
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps(spider_tables()))
    raw = tmp_path / "dev.json"
    raw.write_text(json.dumps([{"db_id": "db_7", "query": "SELECT Year FROM concert",
                                "query_toks": ["SELECT"], "sql": {"from": {}},
                                "question": "Which years?", "question_toks": ["Which"]}]))
    out = tmp_path / "sql_dev.jsonl"
    code, _, stderr = run("sql", "--raw", raw, "--tables", tables, "--out", out)
    assert code == 0, stderr
    record, = read(out)
    assert set(record) == {"prompt", "completion"} and record["completion"] == "SELECT Year FROM concert"
    assert record["prompt"].endswith("\n\nCREATE TABLE concert (concert_id INTEGER, singer_id "
                                     'INTEGER, Year INTEGER, "Start Time" DATETIME)'
                                     "\n\nQuestion: Which years?")
    code, _, stderr = run("sql", "--raw", raw, "--out", out)
    assert code == 2 and stderr.strip() == "error: sql --raw needs --tables FILE (Spider's tables.json)"


def _one_error_line(code, stderr, *parts):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and all(part in lines[0] for part in parts), lines[0]


def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path):
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps(spider_tables()))
    out = tmp_path / "out.jsonl"
    _one_error_line(*run("dialogsum", "--raw", tmp_path / "nope.jsonl", "--out", out)[::2],
                    "nope.jsonl", "no such file")
    no_ref = write_csv(tmp_path / "testset.csv", ["mr"], [("name[A]",)])
    _one_error_line(*run("e2e_nlg", "--raw", no_ref, "--out", out)[::2],
                    "testset.csv", "missing column ref")
    no_dialogue = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "a", "summary": "b"},
                                                     {"summary1": "b"}])
    _one_error_line(*run("dialogsum", "--raw", no_dialogue, "--out", out)[::2],
                    "d.jsonl:2", "missing field 'dialogue'")
    unknown = tmp_path / "dev.json"
    unknown.write_text(json.dumps([{"db_id": "db_1", "query": "SELECT 1 FROM singer", "question": "q"},
                                   {"db_id": "flights", "query": "SELECT 1", "question": "q"}]))
    _one_error_line(*run("sql", "--raw", unknown, "--tables", tables, "--out", out)[::2],
                    "dev.json: item 1", "unknown db_id 'flights'")
    no_query = tmp_path / "noquery.json"
    no_query.write_text(json.dumps([{"db_id": "db_1", "question": "q"}]))
    _one_error_line(*run("sql", "--raw", no_query, "--tables", tables, "--out", out)[::2],
                    "missing field 'query'")
    _one_error_line(*run("sql", "--shared", tmp_path, "--out", tmp_path / "o")[::2],
                    "no datasets/spider folder")
    assert not out.exists()
