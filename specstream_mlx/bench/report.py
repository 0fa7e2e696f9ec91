"""Benchmark figures, the markdown table, the plot and the files in ``--out``.

``Run`` is one method on one prompt; ``summarize`` turns per-prompt runs into
per-method figures; ``write_outputs``
writes ``results.json``, ``results.md`` and (with matplotlib, the ``bench``
extra) ``results.png``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional

#: Methods whose greedy output must equal ``ar``'s in lossless mode.
LOSSLESS = ("ss", "ss-chain", "pld", "ss-pld", "medusa", "eagle")


@dataclass
class Run:
    """One method on one prompt."""

    tokens: List[int]
    ttft_s: float
    decode_s: float
    emitted: int  # tokens the forwards produced, a final EOS included
    forwards: int = 0
    forward_tokens: int = 0
    depth_hits: List[int] = field(default_factory=list)
    peak_memory_gb: float = 0.0
    collectives: Optional[int] = None  # collective operations issued (sharded runs only)

    @property
    def tps(self) -> Optional[float]:
        if self.emitted < 2 or self.decode_s <= 0:
            return None
        return (self.emitted - 1) / self.decode_s


def _quantiles(values: List[float]) -> dict:
    if not values:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2],
            "min": min(values), "max": max(values)}


def summarize(runs: Dict[str, List[Run]], greedy: bool, lossless: bool) -> Dict[str, dict]:
    """Per-method figures over all prompts (see the module docstring for definitions)."""
    out = {}
    base = runs.get("ar")
    for name, items in runs.items():
        tps = [r.tps for r in items if r.tps is not None]
        decode_tokens = sum(r.emitted - 1 for r in items if r.tps is not None)
        decode_time = sum(r.decode_s for r in items if r.tps is not None)
        forwards = sum(r.forwards for r in items)
        depth = max((len(r.depth_hits) for r in items), default=0)
        hits = [sum(r.depth_hits[d] for r in items if d < len(r.depth_hits)) for d in range(depth)]
        entry = {
            "prompts": len(items),
            "tokens": sum(len(r.tokens) for r in items),
            "tps": _quantiles(tps),
            "overall_tps": decode_tokens / decode_time if decode_time > 0 else None,
            "tokens_per_forward": sum(r.forward_tokens for r in items) / forwards if forwards else None,
            "acceptance_by_depth": [h / forwards for h in hits] if forwards else [],
            "ttft_s": _quantiles([r.ttft_s for r in items]),
            "peak_memory_gb": max(r.peak_memory_gb for r in items),
            "collectives_per_token": (sum(r.collectives for r in items) / max(sum(r.emitted for r in items), 1)
                                      if all(r.collectives is not None for r in items) else None),
            "speedup": None, "overall_speedup": None,
            "equal_to_ar": None, "must_equal_ar": greedy and lossless and name.split()[0] in LOSSLESS,
        }
        if base is not None:
            ratios = [r.tps / b.tps for r, b in zip(items, base) if r.tps and b.tps]
            entry["speedup"] = _quantiles(ratios)
            if greedy:
                same = [r.tokens == b.tokens for r, b in zip(items, base)]
                entry["equal_to_ar"] = all(same)
                entry["equal_prompts"] = sum(same)
                entry["mismatches"] = [
                    {"prompt": i, "position": _first_difference(r.tokens, b.tokens)}
                    for i, (r, b) in enumerate(zip(items, base)) if r.tokens != b.tokens]
        out[name] = entry
    if base is not None and out["ar"]["overall_tps"]:
        for entry in out.values():
            if entry["overall_tps"] is not None:
                entry["overall_speedup"] = entry["overall_tps"] / out["ar"]["overall_tps"]
    return out


def _first_difference(a: List[int], b: List[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _num(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _memory(gigabytes: float) -> str:
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1e3:.0f} MB"


def _equal(entry: dict) -> str:
    if entry["equal_to_ar"] is None:
        return "n/a"
    if entry["equal_to_ar"]:
        return "yes"
    flag = "NO (must be equal)" if entry["must_equal_ar"] else "no"
    return f"{flag} {entry['equal_prompts']}/{entry['prompts']}"


def format_table(results: dict) -> str:
    """The markdown report: settings, the per-method table, sweep and device sections."""
    s, env = results["settings"], results["environment"]
    lines = [
        "# specstream-mlx bench",
        "",
        f"model `{s['model']}` ({results['mode']}, gamma={s['gamma']}, {s['dtype']}), "
        f"{results['methods'][next(iter(results['methods']))]['prompts']} prompts from `{s['data']}`, "
        f"max {s['max_tokens']} tokens, temp {s['temp']}, seed {s['seed']}, "
        f"{env['backend']}, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}",
        f"ss tree: widths {s['tree']['widths']}, max nodes {s['tree']['max_nodes']}, "
        f"prune {s['tree']['prune_threshold']}",
        "",
        "| method | tok/s median [p25-p75] | speedup median [p25-p75] | overall speedup "
        "| tokens/forward | acceptance by depth | TTFT median | peak memory | greedy = ar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        tps, sp = e["tps"], e["speedup"] or {}
        depth = " ".join(f"{a:.2f}" for a in e["acceptance_by_depth"]) or "-"
        lines.append(
            f"| {name} | {_num(tps['median'])} [{_num(tps['p25'])}-{_num(tps['p75'])}] "
            f"| {_num(sp.get('median'), 2, 'x')} [{_num(sp.get('p25'), 2)}-{_num(sp.get('p75'), 2)}] "
            f"| {_num(e['overall_speedup'], 2, 'x')} | {_num(e['tokens_per_forward'], 2)} | {depth} "
            f"| {_num(None if e['ttft_s']['median'] is None else e['ttft_s']['median'] * 1e3, 0, ' ms')} "
            f"| {_memory(e['peak_memory_gb'])} | {_equal(e)} |")
    lines += ["", "tok/s: decoding speed after the first token; speedup: per-prompt ratio to ar; "
              "peak memory: the method's weights + the run's extra peak."]
    counted = {n: e["collectives_per_token"] for n, e in results["methods"].items()
               if e.get("collectives_per_token") is not None}
    if counted:
        lines += ["", f"sharded over {s.get('ranks')} ranks ({s.get('shard')}): collective operations per "
                  "generated token (prefill included): "
                  + ", ".join(f"{n} {v:.1f}" for n, v in counted.items())]
    if results.get("sweep"):
        lines += ["", format_sweep(results)]
    if results.get("device"):
        from .env import format_device_report

        ar = results["methods"].get("ar", {}).get("tps", {}).get("median")
        lines += ["", format_device_report(results["device"], ar)]
    mismatched = [n for n, e in results["methods"].items()
                  if e["must_equal_ar"] and e["equal_to_ar"] is False]
    if mismatched:
        lines += ["", f"WARNING: greedy output of {', '.join(mismatched)} differs from ar's "
                  "(lossless mode must match exactly)"]
    return "\n".join(lines) + "\n"


def _sweep_rows(results: dict) -> list:
    """``(median speedup or -1, sweep item, method entry)`` per sweep setting, fastest first."""
    rows = []
    for item in results["sweep"]:
        e = results["methods"][item["name"]]
        speed = (e["speedup"] or {}).get("median")
        rows.append((speed if speed is not None else -1.0, item, e))
    return sorted(rows, key=lambda r: -r[0])


def best_sweep(results: dict) -> Optional[dict]:
    """The sweep setting with the highest median speedup over ``ar``, or ``None``.

    A setting whose greedy output had to equal ``ar``'s and did not is never
    chosen (that would be a bug to fix, not a tree to keep).
    """
    for speed, item, entry in _sweep_rows(results):
        if speed >= 0 and not (entry["must_equal_ar"] and entry["equal_to_ar"] is False):
            return {**item, "speedup": speed}
    return None


def format_sweep(results: dict) -> str:
    """Sweep section: every tree setting by speedup, best first."""
    rows = _sweep_rows(results)
    lines = ["## Tree sweep (ss)", "",
             "| widths | max nodes | tree rows | tok/s median | speedup median | tokens/forward |",
             "|---|---|---|---|---|---|"]
    for speed, item, e in rows:
        lines.append(f"| {','.join(map(str, item['widths']))} | {item['max_nodes'] or 'all'} "
                     f"| {item['nodes']} | {_num(e['tps']['median'])} "
                     f"| {_num(speed if speed >= 0 else None, 2, 'x')} "
                     f"| {_num(e['tokens_per_forward'], 2)} |")
    best = best_sweep(results)
    if best is not None:
        flag = f"--tree-width {','.join(map(str, best['widths']))}"
        flag += f" --max-nodes {best['max_nodes']}" if best["max_nodes"] else ""
        lines += ["", f"best on this machine: `{flag}` ({best['speedup']:.2f}x over ar); "
                  "`--save-tree` stores it in the checkpoint for this backend"]
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> Optional[str]:
    """Bar charts of tokens/s and speedup per method into ``path`` (PNG).

    Returns:
        ``None`` when written, else why not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'specstream-mlx[bench]'): no plot"
    names = list(results["methods"])
    entries = [results["methods"][n] for n in names]
    x = list(range(len(names)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(names) + 4), 4.5))
    med = [e["tps"]["median"] or 0 for e in entries]
    err = [[m - (e["tps"]["p25"] or m) for m, e in zip(med, entries)],
           [(e["tps"]["p75"] or m) - m for m, e in zip(med, entries)]]
    left.bar(x, med, yerr=err, capsize=4, color="tab:blue")
    left.set_ylabel("tokens/s (median, p25-p75)")
    left.set_title("decoding speed")
    bound = (results.get("device") or {}).get("upper_bound_tps")
    if bound and bound <= 4 * max(med + [1e-9]):
        left.axhline(bound, ls="--", color="gray", label=f"bandwidth bound {bound:.0f}")
        left.legend(loc="upper right", fontsize=8)
    elif bound:
        left.text(0.98, 0.98, f"bandwidth bound {bound:.0f} tok/s (off scale)",
                  transform=left.transAxes, ha="right", va="top", fontsize=8, color="gray")
    speed = [(e["speedup"] or {}).get("median") or 0 for e in entries]
    bars = right.bar(x, speed, color="tab:green")
    right.axhline(1.0, ls=":", color="black")
    right.set_ylabel("speedup over ar (median)")
    right.set_title("speedup; labels: tokens/forward")
    for bar, e in zip(bars, entries):
        tpf = e["tokens_per_forward"]
        if tpf is not None:
            right.annotate(f"{tpf:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                           ha="center", va="bottom", fontsize=8)
    for axis in (left, right):
        axis.set_xticks(x)
        axis.set_xticklabels(names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center", fontsize=8)
    fig.suptitle(f"{Path(results['settings']['model']).name}: {results['environment']['backend']}, "
                 f"{results['settings']['dtype']}, temp {results['settings']['temp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(results: dict, out: Path) -> Dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``.

    Returns:
        The files written by kind (``json``, ``table``, ``plot`` when made),
        plus ``plot_skipped`` with the reason when no plot was made.
    """
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, object] = {"json": out / "results.json", "table": out / "results.md"}
    files["json"].write_text(json.dumps(results, indent=1) + "\n")
    files["table"].write_text(format_table(results))
    reason = write_plot(results, out / "results.png")
    if reason is None:
        files["plot"] = out / "results.png"
    else:
        files["plot_skipped"] = reason
    return files
