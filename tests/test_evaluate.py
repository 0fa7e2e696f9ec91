"""`specstream-mlx eval`: per-example scores, plain decoding, paired comparisons."""

import json
import math
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from .helpers import write_base
from specstream_mlx.cli import app
from specstream_mlx.bench import evaluate as evaluate_module
from specstream_mlx.bench.evaluate import (best_score, evaluate, exact_match, paired_difference,
                                           rouge_1, rouge_l)
from specstream_mlx.records import Record


def test_rouge_and_exact_match():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert exact_match("SELECT  name FROM t;", "select name from t") == 1.0
    assert exact_match("SELECT id FROM t", "select name from t") == 0.0


def test_paired_difference_mean_and_stderr():
    first = {"metric": "rouge", "scores": [1.0, 0.5, 0.2]}
    second = {"metric": "rouge", "scores": [0.5, 0.5, 0.1]}
    # differences 0.5, 0.0, 0.1: mean 0.2, sample variance (0.09 + 0.04 + 0.01) / 2 = 0.07
    out = paired_difference(first, second)
    assert out["examples"] == 3
    assert out["difference"] == pytest.approx(0.2)
    assert out["stderr"] == pytest.approx(math.sqrt(0.07 / 3))
    # One of a ROUGE evaluation's two per-example score lists, by name.
    first["scores_by_metric"] = {"rouge1": [1.0, 1.0, 1.0], "rougeL": first["scores"]}
    second["scores_by_metric"] = {"rouge1": [0.0, 0.5, 1.0], "rougeL": second["scores"]}
    assert paired_difference(first, second, "rouge1")["difference"] == pytest.approx(0.5)
    assert paired_difference(first, second, "rougeL") == out
    with pytest.raises(ValueError, match="rerun"):
        paired_difference({"metric": "rouge", "scores": [1.0]}, second, "rouge1")


def test_paired_difference_refuses_unpaired_results():
    with pytest.raises(ValueError, match="not the same examples"):
        paired_difference({"metric": "rouge", "scores": [1.0]}, {"metric": "rouge", "scores": [1.0, 0.0]})
    with pytest.raises(ValueError, match="no per-example scores"):
        paired_difference({"metric": "rouge", "scores": []}, {"metric": "rouge", "scores": []})
    with pytest.raises(ValueError, match="rerun"):
        paired_difference({"metric": "rouge", "quality": 0.3}, {"metric": "rouge", "scores": [1.0]})


def test_cli_eval_stores_scores_and_no_spec_and_batches_give_the_same_text(tmp_path):
    base = write_base(tmp_path / "base", "llama")
    ckpt = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(app, ["init", "--model", str(base), "--out", str(ckpt), "--stream-layers", "2"])
    assert result.exit_code == 0, result.output
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f"{w} {w} done"}) + "\n"
                            for w in ("a", "b b b", "c c", "d")))  # prompts of unequal length
    figures = {}
    for name, extra in (("spec", []), ("plain", ["--no-spec"]), ("batched", ["--batch-size", "2"])):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", "--model", str(ckpt), "--data", str(data), "--num", "3",
                                     "-m", "8", "--out", str(out)] + extra)
        assert result.exit_code == 0, result.output
        printed = json.loads(result.stdout[result.stdout.index("{"):])
        assert "scores" not in printed and "outputs" not in printed
        figures[name] = json.loads(out.read_text())
    spec, plain = figures["spec"], figures["plain"]
    assert spec["examples"] == 3 and len(spec["scores"]) == 3
    assert spec["quality"] == pytest.approx(sum(spec["scores"]) / 3)
    assert spec["scores_by_metric"]["rougeL"] == spec["scores"] and len(spec["scores_by_metric"]["rouge1"]) == 3
    assert plain["tokens_per_forward"] == 1.0 < spec["tokens_per_forward"]
    # Lossless mode: speculative and plain decoding write the same text, so the same scores.
    assert len(spec["outputs"]) == 3 and all(spec["outputs"])
    assert spec["outputs"] == plain["outputs"]
    assert spec["scores"] == plain["scores"]
    assert paired_difference(spec, plain)["difference"] == 0.0
    # mlx-lm's batch_generate (left-padded batches of 2) writes the same greedy text.
    batched = figures["batched"]
    assert batched["outputs"] == plain["outputs"] and batched["scores"] == plain["scores"]
    assert batched["batch_size"] == 2 and batched["tokens_per_forward"] is None
    result = runner.invoke(app, ["eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "0"])
    assert result.exit_code != 0 and "--batch-size" in result.output


# ---------------------------------------------------------------- the paper's metrics


def test_rouge1_and_rougeL_literal_values():
    # same words, other order: unigrams all match, LCS("cat the sat", "the cat sat") = 2
    assert rouge_1("cat the sat", "the cat sat") == 1.0
    assert rouge_l("cat the sat", "the cat sat") == pytest.approx(2 / 3)
    # P = 1, R = 3/5: F1 = 2 * 0.6 / 1.6 = 0.75 for both
    assert rouge_1("a b c", "a b c d e") == pytest.approx(0.75)
    assert rouge_l("a b c", "a b c d e") == pytest.approx(0.75)
    # clipped counts: "the" matches once; P = 1/3, R = 1/2 -> F1 = 0.4
    assert rouge_1("the the the", "the cat") == pytest.approx(0.4)
    assert rouge_l("the the the", "the cat") == pytest.approx(0.4)
    # 5 of 6 words, in order: P = R = 5/6
    assert rouge_1("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # rouge_score's tokenizer: lower case, punctuation (and "_", "£") separate and vanish
    assert rouge_1("Hello, World!", "hello world") == 1.0
    assert rouge_l("costs £30_000", "costs 30 000") == 1.0
    assert rouge_1("", "x") == rouge_1("x", "") == rouge_1("a", "b") == 0.0


def test_multi_reference_is_the_best_reference_per_metric():
    refs = ["c b a", "a b x y"]
    # "c b a": ROUGE-1 1.0, ROUGE-L 1/3; "a b x y": 2 of 3 words, 2 of 4 (4/7) for both
    assert best_score(rouge_1, "a b c", refs) == 1.0
    assert best_score(rouge_l, "a b c", refs) == pytest.approx(4 / 7)
    assert best_score(rouge_l, "a b c", refs[:1]) == pytest.approx(1 / 3)
    assert best_score(exact_match, "SELECT 1", ["select 2", "select  1;"]) == 1.0


def test_exact_match_normalises_only_whitespace_case_and_semicolon():
    assert exact_match("SELECT count(*)\nFROM   head\tWHERE age  >  56 ;",
                       "select count(*) from head where age > 56") == 1.0
    assert exact_match("SELECT count(*) FROM head", "SELECT count ( * ) FROM head") == 0.0
    assert exact_match("SELECT name FROM t WHERE a = 'X'", "SELECT name FROM t WHERE a = 'x'") == 1.0


@pytest.fixture
def fake_generation(monkeypatch):
    """stream_generate replaced: the reply is the prompt's word after "say", one step."""
    def stream_generate(model, tokenizer, prompt, max_tokens, drafter=None):
        yield SimpleNamespace(text=prompt.split("say ", 1)[1], generation_tps=10.0,
                              tokens_per_forward=2.0, forwards=3, acceptance_by_depth=[0.5])

    monkeypatch.setattr(evaluate_module, "stream_generate", stream_generate)
    monkeypatch.setattr(Record, "prompt_text",
                        lambda self, tokenizer: self.messages[-1]["content"])


def test_evaluate_scores_against_all_references_and_reports_both_rouges(tmp_path, fake_generation):
    data = tmp_path / "dev.jsonl"
    data.write_text(
        json.dumps({"prompt": "say a b c", "completion": "c b a", "references": ["c b a", "a b x y"]})
        + "\n" + json.dumps({"prompt": "say a b", "completion": "a b"}) + "\n")
    for metric, first in (("rouge", 4 / 7), ("rougeL", 4 / 7), ("rouge1", 1.0)):
        out = evaluate(None, None, str(data), metric, None, 8, None)
        assert out["metric"] == metric and out["examples"] == 2
        assert out["scores"] == pytest.approx([first, 1.0])
        assert out["quality"] == pytest.approx((first + 1.0) / 2)
        assert out["rouge1"] == pytest.approx(1.0)
        assert out["rougeL"] == pytest.approx((4 / 7 + 1.0) / 2)
        assert out["outputs"] == ["a b c", "a b"] and out["tokens_per_forward"] == 2.0
    exact = evaluate(None, None, str(data), "exact", 1, 8, None)
    assert exact["scores"] == [0.0] and "rouge1" not in exact and "rougeL" not in exact
    with pytest.raises(ValueError, match="metric must be one of rouge, rougeL, rouge1, exact"):
        evaluate(None, None, str(data), "bleu", None, 8, None)


def test_paired_difference_treats_rouge_and_rougeL_as_one_metric():
    out = paired_difference({"metric": "rouge", "scores": [1.0, 0.0]},
                            {"metric": "rougeL", "scores": [0.5, 0.0]})
    assert out["difference"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not the same examples"):
        paired_difference({"metric": "rouge1", "scores": [1.0]}, {"metric": "rougeL", "scores": [1.0]})
