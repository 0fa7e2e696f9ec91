"""Task quality and speed of a model on a JSONL set (the paper judges both).

Quality, as in the paper: ROUGE-1 and ROUGE-L F1 for free text (DialogSum
summaries, E2E descriptions), the best over a record's ``references`` when it
has several; exact match after whitespace and case normalisation for SQL.
Execution match (running both queries and comparing the rows) is not
measured: only the Spider schemas (tables.json) are shipped, not the
databases' contents. Speed: tokens per forward of greedy decoding.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..drafters import Drafter
from ..generate import encode_prompt, stream_generate
from ..records import read_records


def _words(text: str) -> List[str]:
    """Tokens as ``rouge_score``'s default tokenizer makes them (no stemming).

    Lower-cased runs of ASCII letters and digits; everything else separates
    tokens and is dropped.
    """
    return re.findall(r"[a-z0-9]+", text.lower())


def _f1(overlap: int, candidate_len: int, reference_len: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / candidate_len, overlap / reference_len
    return 2 * precision * recall / (precision + recall)


def rouge_1(candidate: str, reference: str) -> float:
    """ROUGE-1 F1 between two texts (overlap of word counts, clipped)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    overlap = sum((Counter(a) & Counter(b)).values())
    return _f1(overlap, len(a), len(b))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (longest common subsequence of words)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return _f1(prev[-1], len(a), len(b))


def normalise_sql(sql: str) -> str:
    """Lower-case, single spaces, no trailing semicolon."""
    return re.sub(r"\s+", " ", sql.strip().rstrip(";").strip()).lower()


def exact_match(candidate: str, reference: str) -> float:
    """1.0 if the queries are equal after ``normalise_sql`` (whitespace, case, ``;``), else 0.0."""
    return float(normalise_sql(candidate) == normalise_sql(reference))


Scorer = Callable[[str, str], float]

#: ``--metric`` names -> per-reference scorers. ``rouge`` is ROUGE-L (the old name).
METRICS: Dict[str, Scorer] = {"rouge": rouge_l, "rougeL": rouge_l, "rouge1": rouge_1,
                              "exact": exact_match}
#: Metrics that also report both ROUGE figures.
ROUGE_METRICS = ("rouge", "rougeL", "rouge1")


def best_score(score: Scorer, candidate: str, references: Sequence[str]) -> float:
    """The best ``score(candidate, reference)`` over the references (multi-reference ROUGE)."""
    return max(score(candidate, reference) for reference in references)


def _same_metric(first: Optional[str], second: Optional[str]) -> bool:
    canonical = {"rouge": "rougeL"}
    return canonical.get(first, first) == canonical.get(second, second)


def _examples(path: str, tokenizer, limit: Optional[int]) -> List[Tuple[str, List[str]]]:
    """(formatted prompt, references) of each record of an eval set.

    The prompt is what precedes the completion (``"completion"``, or the
    trailing assistant message), formatted as generation does
    (``records.Record.prompt_text``). The references are the record's
    ``"references"`` list when it has one, else its completion alone.

    Raises:
        RecordError: missing or empty file, or a bad line (names file and line).
    """
    records = read_records(path, limit=limit or None, need_completion=True, allow_text=False)
    return [(record.prompt_text(tokenizer), record.references or [record.completion])
            for record in records]


class _SpeedTally:
    """Adds up tokens per forward and acceptance by depth over several generations."""

    def __init__(self) -> None:
        self.tokens, self.forwards, self.depth = 0, 0, None

    def add(self, last) -> None:
        """Count the final ``GenerationResponse`` of one generation."""
        self.tokens += round(last.tokens_per_forward * last.forwards)
        self.forwards += last.forwards
        hits = [a * last.forwards for a in last.acceptance_by_depth]
        self.depth = hits if self.depth is None else [x + y for x, y in zip(self.depth, hits)]

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def acceptance_by_depth(self) -> List[float]:
        return [h / max(self.forwards, 1) for h in (self.depth or [])]


def evaluate(model, tokenizer, path: str, metric: str = "rouge", limit: Optional[int] = None,
             max_tokens: int = 128, drafter: Optional[Drafter] = None) -> dict:
    """Generate greedily for each example and score it.

    Args:
        model, tokenizer: from ``load``.
        path: JSONL with prompt/completion or messages records; a record's
            ``"references"`` list (several acceptable replies) replaces its
            completion as the reference set, and each score is the best over
            the references.
        metric: ``"rougeL"`` (ROUGE-L F1; ``"rouge"`` is the same), ``"rouge1"``
            (ROUGE-1 F1) or ``"exact"`` (SQL exact match after whitespace and
            case normalisation, ``normalise_sql``). There is no SQL execution
            match: it needs the databases' contents, and only their schemas
            (Spider's tables.json) are shipped.
        limit: only the first ``limit`` examples.
        max_tokens: generation budget per example.
        drafter: from ``drafters.make_drafter`` (default: the checkpoint's
            tree); ``make_drafter(model, speculative=False)`` decodes one token
            per forward (same text in lossless mode; quicker for a model whose
            streams are untrained).

    Returns:
        ``{"examples", "quality", "quality_stderr", "metric", "tokens_per_forward",
        "generation_tps", "acceptance_by_depth", "scores", "outputs"}``: averages
        over the examples, the standard error of the mean quality, and each
        example's score (of ``metric``) and generated text in file order (for
        paired comparisons, ``paired_difference``). With a ROUGE metric also
        ``"rouge1"`` and ``"rougeL"``: the mean of each (``quality`` is the
        chosen one), and ``"scores_by_metric"``: each one's per-example scores.

    Raises:
        ValueError: an unknown metric.
        RecordError: missing or empty file, or a bad line.
    """
    _check_metric(metric)
    examples = _examples(path, tokenizer, limit)
    outputs, speed, tps = [], _SpeedTally(), 0.0
    for i, (prompt, _) in enumerate(examples, start=1):
        text, last = "", None
        for last in stream_generate(model, tokenizer, prompt, max_tokens, drafter=drafter):
            text += last.text
        outputs.append(text)
        tps += last.generation_tps
        speed.add(last)
        print(f"\r[eval] {i}/{len(examples)} tokens/forward={speed.tokens_per_forward:.2f}",
              file=sys.stderr, end="", flush=True)
    print(file=sys.stderr)
    figures = score_outputs(examples, outputs, metric)
    figures.update({
        "tokens_per_forward": speed.tokens_per_forward,
        "generation_tps": tps / len(examples),
        "acceptance_by_depth": speed.acceptance_by_depth,
    })
    return figures


def evaluate_batched(base, tokenizer, path: str, metric: str = "rouge", limit: Optional[int] = None,
                     max_tokens: int = 128, batch_size: int = 32) -> dict:
    """``evaluate`` by plain greedy decoding, ``batch_size`` examples at a time.

    The text is mlx-lm's: ``mlx_lm.batch_generate`` on ``base`` (the mlx-lm
    model of the checkpoint, as ``bench``'s ``ar`` method decodes it), with the
    prompts encoded as ``generate`` encodes them. It is the model's own greedy
    text, which is what speculative decoding emits, so quality needs no
    drafting; the batch only changes float rounding (padding, row count), which
    can flip a near-tie. No tokens per forward are measured (``None``).
    """
    from mlx_lm import batch_generate

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    _check_metric(metric)
    examples = _examples(path, tokenizer, limit)
    prompts = [encode_prompt(tokenizer, prompt) for prompt, _ in examples]
    outputs: List[str] = []
    tic = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        response = batch_generate(base, tokenizer, prompts[start : start + batch_size],
                                  max_tokens=max_tokens)
        outputs.extend(response.texts)
        print(f"\r[eval] {len(outputs)}/{len(prompts)} "
              f"({len(outputs) / (time.perf_counter() - tic):.2f} examples/s)",
              file=sys.stderr, end="", flush=True)
    print(file=sys.stderr)
    figures = score_outputs(examples, outputs, metric)
    figures.update({"tokens_per_forward": None, "generation_tps": None,
                    "acceptance_by_depth": None, "batch_size": batch_size})
    return figures


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def score_outputs(examples: Sequence[Tuple[str, List[str]]], outputs: Sequence[str],
                  metric: str) -> dict:
    """Quality figures of generated texts against each example's references.

    Returns ``{"examples", "metric", "quality", "quality_stderr", "scores",
    "outputs"}``, plus ``"rouge1"``, ``"rougeL"`` and ``"scores_by_metric"``
    for a ROUGE metric (see ``evaluate``).
    """
    _check_metric(metric)
    assert len(examples) == len(outputs), (len(examples), len(outputs))
    both = metric in ROUGE_METRICS
    scores: List[float] = []
    rouge: Dict[str, List[float]] = {"rouge1": [], "rougeL": []}
    for (_, references), text in zip(examples, outputs):
        if both:
            rouge["rouge1"].append(best_score(rouge_1, text, references))
            rouge["rougeL"].append(best_score(rouge_l, text, references))
            scores.append(rouge["rouge1" if metric == "rouge1" else "rougeL"][-1])
        else:
            scores.append(best_score(METRICS[metric], text, references))
    mean, stderr = _mean_and_stderr(scores)
    figures = {"examples": len(examples), "metric": metric, "quality": mean,
               "quality_stderr": stderr}
    if both:
        figures.update({name: sum(values) / len(values) for name, values in rouge.items()})
        figures["scores_by_metric"] = rouge
    figures.update({"scores": scores, "outputs": list(outputs)})
    return figures


def _mean_and_stderr(values: Sequence[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_difference(first: dict, second: dict, metric: Optional[str] = None) -> dict:
    """Mean per-example quality difference ``first - second`` and its standard error.

    Both results must come from ``evaluate`` on the same examples (same file
    and ``--num``) with the same metric (``rouge`` and ``rougeL`` are one):
    pairing removes the spread between examples, which is much larger than
    the spread between two fine-tunes of one model.

    ``metric``: ``"rouge1"`` or ``"rougeL"`` compares that one of a ROUGE
    evaluation's two scores (default: the evaluation's own metric).

    Raises:
        ValueError: the results lack per-example scores or cover different sets.
    """
    if metric is None:
        a, b = first.get("scores"), second.get("scores")
    else:
        a, b = (r.get("scores_by_metric", {}).get(metric) for r in (first, second))
    if a is None or b is None:
        raise ValueError("per-example scores missing: rerun `specstream-mlx eval` (it stores them)")
    if not a:
        raise ValueError("no per-example scores to compare")
    if len(a) != len(b) or not _same_metric(first.get("metric"), second.get("metric")):
        raise ValueError(f"not the same examples: {len(a)} {first.get('metric')} scores "
                         f"vs {len(b)} {second.get('metric')}")
    mean, stderr = _mean_and_stderr([x - y for x, y in zip(a, b)])
    return {"examples": len(a), "difference": mean, "stderr": stderr}


def speed_on_prompts(model, tokenizer, prompts: List[List[int]], max_tokens: int = 64,
                     drafter: Optional[Drafter] = None) -> dict:
    """Tokens per forward and acceptance by depth of greedy decoding on token prompts.

    ``drafter``: from ``drafters.make_drafter`` (default: the checkpoint's tree).
    """
    speed = _SpeedTally()
    for prompt in prompts:
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens, drafter=drafter):
            pass
        speed.add(last)
    return {
        "val_tokens_per_forward": speed.tokens_per_forward,
        "val_acceptance_by_depth": speed.acceptance_by_depth,
    }
