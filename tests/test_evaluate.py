"""`specstream-mlx eval`: per-example scores, plain decoding, paired comparisons."""

import json
import math

import pytest
from typer.testing import CliRunner

from .helpers import write_base
from specstream_mlx.cli import app
from specstream_mlx.bench.evaluate import exact_match, paired_difference, rouge_l


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


def test_paired_difference_refuses_unpaired_results():
    with pytest.raises(ValueError, match="not the same examples"):
        paired_difference({"metric": "rouge", "scores": [1.0]}, {"metric": "rouge", "scores": [1.0, 0.0]})
    with pytest.raises(ValueError, match="no per-example scores"):
        paired_difference({"metric": "rouge", "scores": []}, {"metric": "rouge", "scores": []})
    with pytest.raises(ValueError, match="rerun"):
        paired_difference({"metric": "rouge", "quality": 0.3}, {"metric": "rouge", "scores": [1.0]})


def test_cli_eval_stores_scores_and_no_spec_gives_the_same_text(tmp_path):
    base = write_base(tmp_path / "base", "llama")
    ckpt = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(app, ["init", "--model", str(base), "--out", str(ckpt), "--stream-layers", "2"])
    assert result.exit_code == 0, result.output
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f"{w} {w} done"}) + "\n"
                            for w in ("a", "b", "c", "d")))
    figures = {}
    for name, extra in (("spec", []), ("plain", ["--no-spec"])):
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
    assert plain["tokens_per_forward"] == 1.0 < spec["tokens_per_forward"]
    # Lossless mode: speculative and plain decoding write the same text, so the same scores.
    assert len(spec["outputs"]) == 3 and all(spec["outputs"])
    assert spec["outputs"] == plain["outputs"]
    assert spec["scores"] == plain["scores"]
    assert paired_difference(spec, plain)["difference"] == 0.0
