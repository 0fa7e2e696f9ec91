"""The paper's results table (Table 1) for one task, from a bench run and two evaluations.

One row per method, in the paper's columns::

    | dataset | method | speedup | CR ratio (tokens per forward) | metric | extra parameters |

Sources, all measured on the task's test split:

* ``bench``: ``specstream-mlx bench`` results on the SS model with the methods
  ``ar`` (mlx-lm's decoding), ``ss``, ``pld`` and ``draft`` interleaved in one run;
  speedup and tokens per forward come from here.
* ``ss_eval`` and ``baseline_eval``: ``specstream-mlx eval --out`` of the SS model
  and of the plain-LoRA baseline on the same examples. Greedy speculative
  methods return the SS model's own greedy text (checked in the bench:
  ``equal_to_ar``), so SS, prompt lookup and draft-model rows share the SS
  model's quality; the difference to the baseline comes with its paired
  standard error.

The baseline row's speed is mlx-lm decoding of a model of the same shape: the
``ar`` timing of the run (1.00x by definition).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .evaluate import paired_difference

COLUMNS = ("dataset", "method", "speedup", "CR ratio (tokens per forward)", "metric", "extra parameters")
LABELS = {"ar": "baseline (plain LoRA, mlx-lm decoding)", "ss": "SS (ours)",
          "pld": "prompt lookup", "draft": "mlx-lm draft model (4-bit copy)"}
ORDER = ("ar", "ss", "pld", "draft")


def _count(n: Optional[float]) -> str:
    if n is None:
        return "?"
    if n == 0:
        return "0"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def quality_text(evaluation: dict, baseline: Optional[dict] = None) -> str:
    """``ROUGE-1 / ROUGE-L`` (or exact match) with the paired difference to ``baseline``."""
    rouge = "rouge1" in evaluation and "rougeL" in evaluation
    text = (f"R1 {evaluation['rouge1']:.3f} / RL {evaluation['rougeL']:.3f}" if rouge
            else f"EM {evaluation['quality']:.3f}")
    if baseline is not None and baseline is not evaluation:
        parts = []
        for metric in (("rouge1", "rougeL") if rouge else (None,)):
            d = paired_difference(evaluation, baseline, metric)
            parts.append(f"{d['difference']:+.3f}±{d['stderr']:.3f}")
        text += f" ({' / '.join(parts)} vs baseline, paired, n={d['examples']})"
    elif baseline is not None:
        text += f" (n={evaluation['examples']})"
    return text


def table_rows(dataset: str, bench: dict, ss_eval: dict, baseline_eval: dict,
               ss_extra_params: Optional[int], draft_params: Optional[int]) -> List[Dict[str, str]]:
    """Rows of the table for one task (see the module docstring for the sources).

    Raises:
        ValueError: the bench lacks one of the methods, a greedy speculative method did
            not reproduce ``ar``'s text, or the evaluations cover different examples.
    """
    methods = bench.get("methods", {})
    missing = [m for m in ORDER if m not in methods]
    if missing:
        raise ValueError(f"the bench run has no {', '.join(missing)}: rerun it with --methods ar,ss,pld,draft")
    differing = [m for m in ORDER if methods[m].get("equal_to_ar") is False]
    if differing:
        raise ValueError(f"{', '.join(differing)} did not reproduce ar's greedy text: the rows would "
                         "not share one quality figure")
    paired_difference(ss_eval, baseline_eval)  # refuses different example sets
    extra = {"ar": 0, "ss": ss_extra_params, "pld": 0, "draft": draft_params}
    rows = []
    for method in ORDER:
        entry = methods[method]
        quality = quality_text(baseline_eval, baseline_eval) if method == "ar" else quality_text(ss_eval, baseline_eval)
        rows.append({
            "dataset": dataset,
            "method": LABELS[method],
            "speedup": f"{entry['overall_speedup']:.2f}x",
            "CR ratio (tokens per forward)": f"{entry['tokens_per_forward']:.2f}",
            "metric": quality,
            "extra parameters": _count(extra[method]) + (" (4-bit)" if method == "draft" else ""),
        })
    return rows


def format_rows(rows: List[Dict[str, str]], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
