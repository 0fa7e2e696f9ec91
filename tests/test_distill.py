"""``specstream-mlx distill`` and the prompt builder: greedy answers, resume, dedup, errors."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from .helpers import reference_tokens, write_base
from specstream_mlx.cli import app
from specstream_mlx.records import RecordError
from specstream_mlx.train import distill as distill_module
from specstream_mlx.train.data import Example, load_examples
from specstream_mlx.train.distill import (
    _locked_append, distill_corpus, prompt_key, read_corpus, read_prompts)

ROOT = Path(__file__).resolve().parents[1]
EOS = 257  # tests/helpers.py's tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("distill") / "base", "llama")


@pytest.fixture(scope="module")
def loaded(base_dir):
    from specstream_mlx.loading import _load_base

    base, tokenizer, _, _ = _load_base(base_dir, None)
    return base, tokenizer


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prompt_file(tmp_path, n, name="prompts.jsonl", **extra):
    return _write(tmp_path / name, [dict({"prompt": f"question {i}: tell me"}, **extra)
                                    for i in range(n)])


class Counting:
    """``mlx_lm.batch_generate`` that counts the prompts it is given (and can fail)."""

    def __init__(self, fail_on_call=None):
        import mlx_lm

        self.real, self.prompts, self.calls, self.fail_on_call = mlx_lm.batch_generate, 0, 0, fail_on_call

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the run is killed while generating
        self.prompts += len(prompts)
        return self.real(model, tokenizer, prompts, **kwargs)


def test_answers_are_the_models_greedy_tokens_with_per_prompt_caps(tmp_path, loaded):
    base, tokenizer = loaded
    prompts = _write(tmp_path / "p.jsonl", [
        {"prompt": "alpha", "max_tokens": 3, "source": "a"},
        {"prompt": "beta gamma"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "more"}], "max_tokens": 9},
        {"text": "delta", "max_tokens": 1},
    ])
    read = read_prompts(prompts, tokenizer, max_tokens=6)
    assert [p.max_tokens for p in read] == [3, 6, 9, 1]
    assert [p.source for p in read] == ["a", None, None, None]
    # The prompt is what generate/bench/training decode from: the templated messages.
    assert tokenizer.decode(list(read[2].tokens)).endswith("<user>more\n<assistant>")
    figures = distill_corpus(base, tokenizer, read, tmp_path / "c.jsonl", batch_size=2, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and figures["answered"] == 4
    assert lines[0]["source"] == "a" and "source" not in lines[1]
    for prompt, line in zip(read, lines):
        head, answer = line["tokens"][: line["loss_start"]], line["tokens"][line["loss_start"]:]
        assert head == list(prompt.tokens) and line["max_tokens"] == prompt.max_tokens
        greedy = reference_tokens(base, list(prompt.tokens), prompt.max_tokens)
        ended = greedy.index(EOS) if EOS in greedy else prompt.max_tokens
        assert answer == greedy[:ended]
    assert figures["tokens"] == sum(len(l["tokens"]) - l["loss_start"] for l in lines)
    assert len({len(l["tokens"]) - l["loss_start"] for l in lines}) > 1  # varied lengths


def test_a_prompt_given_twice_is_answered_once(tmp_path, loaded, monkeypatch):
    base, tokenizer = loaded
    prompts = _write(tmp_path / "p.jsonl", [
        {"prompt": "same"}, {"prompt": "other"},
        {"messages": [{"role": "user", "content": "same"}]},  # the same tokens as line 1
        {"prompt": "same", "max_tokens": 2},
    ])
    counting = Counting()
    monkeypatch.setattr("mlx_lm.batch_generate", counting)
    figures = distill_corpus(base, tokenizer, read_prompts(prompts, tokenizer, 4),
                             tmp_path / "c.jsonl", batch_size=4, progress=False)
    assert counting.prompts == 2 and figures["duplicates"] == 2
    lines = [json.loads(l) for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["max_tokens"] == 4  # the first occurrence's cap
    keys = {prompt_key(l["tokens"][: l["loss_start"]]) for l in lines}
    assert len(keys) == 2


def test_a_killed_run_resumes_where_it_stopped(tmp_path, loaded, monkeypatch):
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 7), tokenizer, max_tokens=5)
    whole = tmp_path / "whole.jsonl"
    distill_corpus(base, tokenizer, prompts, whole, batch_size=1, progress=False)  # chunks of 4
    corpus = tmp_path / "c.jsonl"
    monkeypatch.setattr("mlx_lm.batch_generate", Counting(fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        distill_corpus(base, tokenizer, prompts, corpus, batch_size=1, progress=False)
    assert corpus.read_text() == "".join(whole.read_text().splitlines(True)[:4])
    # Killed while appending the next chunk: a partial last line.
    with open(corpus, "a") as handle:
        handle.write(whole.read_text().splitlines(True)[4][:25])
    assert len(read_corpus(corpus)) == 4  # the partial line is not a record
    counting = Counting()
    monkeypatch.setattr("mlx_lm.batch_generate", counting)
    figures = distill_corpus(base, tokenizer, prompts, corpus, batch_size=1, progress=False)
    assert counting.prompts == 3 and figures["already"] == 4 and figures["answered"] == 3
    assert corpus.read_bytes() == whole.read_bytes()
    # Done: a rerun generates nothing; more prompts: only the new ones.
    counting.prompts = 0
    distill_corpus(base, tokenizer, prompts, corpus, batch_size=1, progress=False)
    assert counting.prompts == 0 and corpus.read_bytes() == whole.read_bytes()
    more = read_prompts(_prompt_file(tmp_path, 9, "more.jsonl"), tokenizer, max_tokens=5)
    figures = distill_corpus(base, tokenizer, more, corpus, batch_size=1, progress=False)
    assert counting.prompts == 2 and figures["corpus_records"] == 9
    assert len(read_corpus(corpus)) == 9


def test_limit_answers_only_the_first_prompts(tmp_path, loaded):
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 5), tokenizer, max_tokens=2)
    figures = distill_corpus(base, tokenizer, prompts, tmp_path / "c.jsonl", limit=2, progress=False)
    assert figures["answered"] == 2 and len(read_corpus(tmp_path / "c.jsonl")) == 2


def test_bad_prompt_files_name_file_and_line(tmp_path, loaded):
    _, tokenizer = loaded
    with pytest.raises(RecordError, match="missing.jsonl does not exist"):
        read_prompts(tmp_path / "missing.jsonl", tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match="empty.jsonl holds no prompts"):
        read_prompts(tmp_path / "empty.jsonl", tokenizer)
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ("not json", r"bad.jsonl:2: not valid JSON"),
        ('{"oops": 1}', r"bad.jsonl:2: expected a \"prompt\""),
        ('{"prompt": "x", "max_tokens": 0}', r"bad.jsonl:2: \"max_tokens\" must be a positive"),
        ('{"prompt": "x", "max_tokens": "64"}', r"bad.jsonl:2: \"max_tokens\" must be"),
        ('{"prompt": "x", "source": 3}', r"bad.jsonl:2: \"source\" must be a string"),
    ]:
        bad.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(RecordError, match=message):
            read_prompts(bad, tokenizer)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        read_prompts(tmp_path / "empty.jsonl", tokenizer, max_tokens=0)


def test_a_corrupt_corpus_is_refused_and_left_alone(tmp_path, loaded):
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 2), tokenizer, max_tokens=2)
    corpus = tmp_path / "c.jsonl"
    for text, message in [('{"tokens": [1, 2], "loss_start": 1}\nnot json\n{"tokens": [1', r"c.jsonl:2: not valid JSON"),
                          ('{"tokens": [1, 2], "loss_start": 3}\n', r'c.jsonl:1: "loss_start" must be an integer in 1..2'),
                          ('{"prompt": "a text record"}\n', r"c.jsonl:1: expected")]:
        corpus.write_text(text)
        with pytest.raises(RecordError, match=message):
            distill_corpus(base, tokenizer, prompts, corpus, progress=False)
        assert corpus.read_text() == text
    with pytest.raises(ValueError, match="is a folder"):
        distill_corpus(base, tokenizer, prompts, tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        distill_corpus(base, tokenizer, prompts, corpus, batch_size=0, progress=False)


def test_a_second_writer_is_refused(tmp_path, loaded):
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 1), tokenizer, max_tokens=2)
    corpus = tmp_path / "c.jsonl"
    with _locked_append(corpus):
        with pytest.raises(ValueError, match="being written by another distill run"):
            distill_corpus(base, tokenizer, prompts, corpus, progress=False)
    distill_corpus(base, tokenizer, prompts, corpus, progress=False)
    assert len(read_corpus(corpus)) == 1


def test_cli_distill_end_to_end(tmp_path, base_dir):
    prompts = _prompt_file(tmp_path, 5)
    _write(tmp_path / "p2.jsonl", [{"prompt": "question 0: tell me"}, {"prompt": "new one"}])
    corpus = tmp_path / "out" / "corpus.jsonl"
    runner = CliRunner()
    args = ["distill", "--model", str(base_dir), "--prompts", str(prompts), "--out", str(corpus),
            "--max-tokens", "4", "--batch-size", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("distilled 5 prompts") and "tokens/s" in last
    assert "[distill] 5/5 prompts" in result.output
    before = corpus.read_bytes()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "distilled 0 prompts (5 answered before" in result.output
    assert corpus.read_bytes() == before
    result = runner.invoke(app, args[:4] + [str(tmp_path / "p2.jsonl")] + args[5:])
    assert result.exit_code == 0 and "distilled 1 prompts (1 answered before" in result.output
    examples = [e for e in read_corpus(corpus) if e.loss_start < len(e.tokens)]
    assert len(examples) <= 6 and all(0 < e.loss_start < len(e.tokens) for e in examples)


@pytest.mark.parametrize("args, code, message", [
    (["--prompts", "{tmp}/missing.jsonl"], 1, "missing.jsonl does not exist"),
    (["--prompts", "{tmp}/empty.jsonl"], 1, "empty.jsonl holds no prompts"),
    (["--prompts", "{tmp}/bad.jsonl"], 1, "bad.jsonl:2: not valid JSON"),
    (["--prompts", "{tmp}/good.jsonl", "--batch-size", "0"], 2, "--batch-size must be"),
    (["--prompts", "{tmp}/good.jsonl", "--max-tokens", "0"], 2, "--max-tokens must be"),
])
def test_cli_distill_bad_input_is_one_error_line(tmp_path, base_dir, args, code, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    _prompt_file(tmp_path, 1, "good.jsonl")
    corpus = tmp_path / "corpus.jsonl"
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["distill", "--model", str(base_dir), "--out", str(corpus)]
                                + args)
    assert result.exit_code == code, result.output
    errors = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not corpus.exists()


def test_corpus_examples_are_exact_token_ids(tmp_path, loaded):
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 3), tokenizer, max_tokens=4)
    corpus = tmp_path / "c.jsonl"
    distill_corpus(base, tokenizer, prompts, corpus, progress=False)
    raw = [json.loads(l) for l in corpus.read_text().splitlines()]
    assert [e for e in read_corpus(corpus) if e.loss_start < len(e.tokens)] == [Example(tuple(r["tokens"]), r["loss_start"]) for r in raw
                                   if r["loss_start"] < len(r["tokens"])]
    # An answer that ended at once marks its prompt done but is no training example.
    with open(corpus, "a") as handle:
        handle.write(json.dumps({"tokens": [5, 6], "loss_start": 2}) + "\n")
    assert len(read_corpus(corpus)) == len(raw) + 1 and len([e for e in read_corpus(corpus) if e.loss_start < len(e.tokens)]) == len(
        [r for r in raw if r["loss_start"] < len(r["tokens"])])


def test_the_trainer_reads_a_corpus(tmp_path, loaded):
    """`specstream-mlx train --data CORPUS` takes the exact token ids, empty answers left out."""
    base, tokenizer = loaded
    prompts = read_prompts(_prompt_file(tmp_path, 3), tokenizer, max_tokens=4)
    corpus = tmp_path / "c.jsonl"
    distill_corpus(base, tokenizer, prompts, corpus, progress=False)
    with open(corpus, "a") as handle:
        handle.write(json.dumps({"tokens": [5, 6], "loss_start": 2}) + "\n")
    want = [e for e in read_corpus(corpus) if e.loss_start < len(e.tokens)]
    assert len(want) == 3 and load_examples(str(corpus), tokenizer) == want


# ---------------------------------------------------------------- the prompt builder

def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_distill_prompts", ROOT / "scripts" / "build_distill_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_shared(root: Path):
    """A miniature ../shared/datasets with the real files' fields."""
    d = root / "datasets"
    for name in ("dialogsum", "e2e_nlg", "gsm8k", "spider"):
        (d / name).mkdir(parents=True)
    _write(d / "dialogsum" / "dialogsum.train.jsonl",
           [{"dialogue": f"#Person1#: train talk {i}", "summary": f"sum {i}"} for i in range(30)]
           + [{"dialogue": "#Person1#: dev talk 0", "summary": "leaked"}])
    _write(d / "dialogsum" / "dialogsum.dev.jsonl",
           [{"dialogue": f"#Person1#: dev talk {i}", "summary": f"dev {i}"} for i in range(6)])
    with open(d / "e2e_nlg" / "devset.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mr", "ref"])
        for i in range(20):
            writer.writerow([f"name[Place {i}], food[Thai]", f"Place {i} serves Thai food."])
    _write(d / "gsm8k" / "train.jsonl", [
        {"question": f"Tom has {i} apples. How many?", "answer": f"He has <<{i}={i}>>{i}.\n#### {i}"}
        for i in range(25)])
    dbs = [f"db{i}" for i in range(10)]
    (d / "spider" / "tables.json").write_text(json.dumps([
        {"db_id": db, "table_names_original": ["t"], "column_names_original": [[-1, "*"], [0, "a"]],
         "column_types": ["text", "number"]} for db in dbs]))
    (d / "spider" / "train_spider.slim.json").write_text(json.dumps([
        {"db_id": db, "question": f"How many in {db} case {k}?", "query": f"SELECT count(*) FROM t -- {db} {k}"}
        for db in dbs for k in range(3)]))
    return root


def test_prompt_builder_is_seeded_uses_training_parts_only_and_varies_lengths(tmp_path, capsys):
    builder = _builder()
    shared = _fake_shared(tmp_path / "shared")
    counts = ["--dialogsum", "100", "--dialogsum-alt", "3", "--dialogsum-multi", "4",
              "--gsm8k", "6", "--gsm8k-multi", "3", "--e2e_nlg-multi", "4", "--sql", "100"]
    out = tmp_path / "p.jsonl"
    assert builder.main(["--shared", str(shared), "--out", str(out)] + counts) == 0
    printed = capsys.readouterr().out
    assert "gsm8k-multi" in printed and f"prompts to {out}" in printed
    again = tmp_path / "again.jsonl"
    assert builder.main(["--shared", str(shared), "--out", str(again)] + counts) == 0
    assert out.read_bytes() == again.read_bytes()
    assert builder.main(["--shared", str(shared), "--out", str(again), "--seed", "1"] + counts) == 0
    assert out.read_bytes() != again.read_bytes()
    records = [json.loads(l) for l in out.read_text().splitlines()]
    recipe = json.loads((tmp_path / "p.recipe.json").read_text())
    assert recipe["total"] == len(records) and recipe["seed"] == 0
    sources = {}
    for r in records:
        sources[r["source"]] = sources.get(r["source"], 0) + 1
    assert sources == recipe["written"]
    assert sources["dialogsum"] == 30 and sources["gsm8k"] == 6 and sources["dialogsum-multi"] == 4
    assert {r["max_tokens"] for r in records} == {64, 128, 256}
    text = out.read_text()
    # Held out by build_task_data (seed 0): dialogsum's dev dialogues, e2e's dev/test MRs and
    # spider's dev/test databases; and the bench's chat prompts.
    import build_task_data as tasks

    folder = shared / "datasets"
    _, dev, test, _ = tasks.build_e2e(folder / "e2e_nlg", 0)
    _, sdev, stest, meta = tasks.build_sql(folder / "spider", 0)
    assert "dev talk" not in text and "leaked" not in text
    for r in dev + test:
        assert r["prompt"].rpartition("\n\n")[2] not in text
    held_dbs = meta["databases"]["dev"] + meta["databases"]["test"]
    assert held_dbs and not any(f"{db} case" in text for db in held_dbs)
    assert sources["sql"] == 24  # all 8 training databases x 3 questions
    bench = {json.loads(l)["prompt"] for l in
             (ROOT / "benchmarks/chat_prompts.jsonl").read_text().splitlines() if l.strip()}
    asked = [r.get("prompt") or r["messages"][-1]["content"] for r in records]
    assert sources["chat"] > 500 and bench and not bench.intersection(asked)
    multi = [r for r in records if "messages" in r]
    assert multi and all([m["role"] for m in r["messages"]] == ["user", "assistant", "user"]
                         for r in multi)
    gsm = [r for r in multi if r["source"] == "gsm8k-multi"]
    assert all("<<" not in r["messages"][1]["content"] and "The answer is" in r["messages"][1]["content"]
               for r in gsm)


def test_prompt_builder_output_is_read_by_distill(tmp_path, loaded):
    _, tokenizer = loaded
    builder = _builder()
    shared = _fake_shared(tmp_path / "shared")
    out = tmp_path / "p.jsonl"
    assert builder.main(["--shared", str(shared), "--out", str(out), "--chat", "5",
                         "--chat-styled", "1"]) == 0
    prompts = read_prompts(out, tokenizer)
    assert len(prompts) == len(out.read_text().splitlines())
    assert {p.max_tokens for p in prompts} == {64, 128, 256}


def test_chat_followups_use_the_models_own_finished_answers_and_exclusions_hold(tmp_path, loaded,
                                                                                base_dir):
    _, tokenizer = loaded
    builder = _builder()
    shared = _fake_shared(tmp_path / "shared")
    none = ["--dialogsum", "0", "--dialogsum-alt", "0", "--dialogsum-multi", "0", "--gsm8k", "0",
            "--gsm8k-alt", "0", "--gsm8k-multi", "0", "--e2e_nlg", "0", "--e2e_nlg-alt", "0",
            "--e2e_nlg-multi", "0", "--sql", "0", "--sql-alt", "0", "--sql-multi", "0"]
    first = tmp_path / "p.jsonl"
    assert builder.main(["--shared", str(shared), "--out", str(first), "--chat", "6",
                         "--chat-styled", "0", "--lengths", "8", "--length-weights", "1"] + none) == 0
    records = [json.loads(l) for l in first.read_text().splitlines()]
    prompts = read_prompts(first, tokenizer)
    # A corpus as distill writes it (no EOS stored): answers 0 and 1 ended by themselves,
    # answer 2 was cut at its max_tokens; the others were never distilled.
    answer = tokenizer.encode("fine", add_special_tokens=False)
    corpus = _write(tmp_path / "c.jsonl", [
        {"tokens": list(p.tokens) + answer * n, "loss_start": len(p.tokens),
         "max_tokens": 4 * len(answer), "source": "chat"} for p, n in zip(prompts[:3], (1, 2, 4))])
    # The first chat request is held out; the second request's plain form is excluded.
    held = _write(tmp_path / "held.jsonl", [{"prompt": records[0]["prompt"]}])
    exclude = _write(tmp_path / "ex.jsonl", [{"prompt": records[1]["prompt"]}])
    out = tmp_path / "extra.jsonl"
    args = ["--shared", str(shared), "--out", str(out), "--chat", "6", "--chat-styled", "0",
            "--chat-followup", "100", "--answers", str(corpus), "--answers-prompts", str(first),
            "--model", str(base_dir), "--held-out", str(held), "--exclude", str(exclude),
            "--lengths", "8", "--length-weights", "1"] + none
    assert builder.main(args) == 0
    extra = [json.loads(l) for l in out.read_text().splitlines()]
    follow = [r for r in extra if r["source"] == "chat-followup"]
    # Only answers 0 and 1 qualify, and answer 0's request is held out.
    assert len(follow) == len(builder.FOLLOW_UPS["chat"])
    for r in follow:
        user, assistant, again = r["messages"]
        assert user["content"] == records[1]["prompt"]
        assert assistant["content"] == tokenizer.decode(answer * 2).strip()
        assert again["content"] in builder.FOLLOW_UPS["chat"]
    plain = {r["prompt"] for r in extra if "prompt" in r}
    assert records[0]["prompt"] not in plain and records[1]["prompt"] not in plain
    assert {r["prompt"] for r in records[2:]} <= plain
    recipe = json.loads((tmp_path / "extra.recipe.json").read_text())
    # Held out: request 0 and its follow-ups; excluded: request 1's plain form.
    assert recipe["dropped"]["held_out"] == 1 + len(follow) and recipe["dropped"]["excluded"] == 1
    # Follow-ups without answers are one clear error.
    assert builder.main(["--shared", str(shared), "--out", str(tmp_path / "x.jsonl"),
                         "--chat-followup", "3"] + none) == 2
    assert not (tmp_path / "x.jsonl").exists()
