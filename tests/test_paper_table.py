"""The paper's table rows come from the measured files, and refuse inconsistent ones."""

import pytest

from specstream_mlx.bench.paper_table import format_rows, table_rows


def _method(speedup, cr, equal=True):
    return {"overall_speedup": speedup, "tokens_per_forward": cr, "equal_to_ar": equal}


BENCH = {"methods": {"ar": _method(1.0, 1.0, None), "ss": _method(1.9, 3.1), "pld": _method(1.2, 1.4),
                     "draft": _method(0.8, 2.5)}}
SS = {"examples": 3, "metric": "rougeL", "quality": 0.5, "rouge1": 0.6, "rougeL": 0.5,
      "scores": [0.5, 0.6, 0.4], "scores_by_metric": {"rouge1": [0.6, 0.7, 0.5], "rougeL": [0.5, 0.6, 0.4]}}
BASE = {"examples": 3, "metric": "rougeL", "quality": 0.5, "rouge1": 0.6, "rougeL": 0.5,
        "scores": [0.4, 0.6, 0.5], "scores_by_metric": {"rouge1": [0.6, 0.6, 0.6], "rougeL": [0.4, 0.6, 0.5]}}


def test_rows_in_the_papers_columns():
    rows = table_rows("E2E-NLG", BENCH, SS, BASE, 1728, 134_515_008)
    text = format_rows(rows)
    lines = text.splitlines()
    assert lines[0] == ("| dataset | method | speedup | CR ratio (tokens per forward) | metric | "
                        "extra parameters |")
    assert lines[2] == "| E2E-NLG | baseline (plain LoRA, mlx-lm decoding) | 1.00x | 1.00 | R1 0.600 / RL 0.500 (n=3) | 0 |"
    # rougeL differences 0.1, 0, -0.1: mean 0, stderr sqrt(0.01 / 3); rouge1: 0, 0.1, -0.1
    assert lines[3] == ("| E2E-NLG | SS (ours) | 1.90x | 3.10 | R1 0.600 / RL 0.500 "
                        "(+0.000±0.058 / +0.000±0.058 vs baseline, paired, n=3) | 1.7K |")
    assert lines[5].startswith("| E2E-NLG | mlx-lm draft model (4-bit copy) | 0.80x | 2.50 |")
    assert lines[5].endswith("| 134.5M (4-bit) |")


def test_exact_match_rows():
    ss = {"examples": 2, "metric": "exact", "quality": 0.5, "scores": [1.0, 0.0]}
    base = {"examples": 2, "metric": "exact", "quality": 0.0, "scores": [0.0, 0.0]}
    rows = table_rows("SQL", BENCH, ss, base, 10, None)
    assert rows[1]["metric"] == "EM 0.500 (+0.500±0.500 vs baseline, paired, n=2)"
    assert rows[3]["extra parameters"] == "? (4-bit)"


def test_refuses_missing_methods_and_unequal_outputs():
    with pytest.raises(ValueError, match="no draft"):
        table_rows("x", {"methods": {k: v for k, v in BENCH["methods"].items() if k != "draft"}}, SS, BASE, 1, 1)
    bad = {"methods": {**BENCH["methods"], "pld": _method(1.2, 1.4, equal=False)}}
    with pytest.raises(ValueError, match="pld did not reproduce"):
        table_rows("x", bad, SS, BASE, 1, 1)
    with pytest.raises(ValueError, match="not the same examples"):
        table_rows("x", BENCH, SS, {**BASE, "scores": [0.1]}, 1, 1)
