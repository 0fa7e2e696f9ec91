"""Speed of Speculative Streaming against mlx-lm and other speculative methods.

Methods (``METHODS``):

* ``ar``: mlx-lm's own ``stream_generate`` of the base model (the baseline);
* ``ss``: Speculative Streaming with the given tree;
* ``ss-chain``: SS with a single chain of ``gamma`` drafts (no tree);
* ``pld``: prompt-lookup decoding (``drafters.PromptLookupDrafter``) through the same
  verification code;
* ``ss-pld``: the ``ss`` tree plus a prompt-lookup chain in the same forward
  (``drafters.StreamLookupDrafter``);
* ``draft``: mlx-lm's speculative decoding with a draft model (default: a 4-bit
  quantized copy of the target);
* ``medusa``, ``eagle``: the checkpoint's Medusa heads (``heads.py``) or EAGLE-style
  head (``eagle.py``), the peer methods, with the ``ss`` tree and the same
  verification (only on request: they need the heads).

Every method runs on the same prompts, interleaved prompt by prompt (the order
rotates from one prompt to the next) after a warm-up, so machine drift hits all
alike. ``ar`` and ``draft`` run a separate mlx-lm load of the checkpoint's base
model in the SS model's dtype, so all methods compute in the same precision.

Per run: ``tps`` = (tokens - 1) / (time of the last token - time of the
first), i.e. decoding speed without the prefill; ``ttft_s`` = time to the first
token (prefill included); tokens per forward = tokens emitted by decode forwards
/ those forwards (``ar``: 1; ``draft``: tokens / target verification steps).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx

from .prompts import BenchError, load_prompts
from .report import Run, summarize
from ..config import TreeSettings, tree_settings
from ..drafters import make_drafter
from ..generate import max_context, stream_generate
from ..tree import build_tree

METHODS = ("ar", "ss", "ss-chain", "pld", "ss-pld", "draft", "medusa", "eagle")
#: What runs without --methods (medusa and eagle need a checkpoint with their heads).
DEFAULT_METHODS = ("ar", "ss", "ss-chain", "pld", "ss-pld", "draft")


def check_methods(names: Sequence[str]) -> List[str]:
    """``names`` if each is one of ``METHODS`` (the one check of method names).

    Raises:
        BenchError: an unknown name.
    """
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)} "
                         "(comma-separated)")
    return list(names)


@dataclass
class BenchSettings:
    """Everything that decides what a benchmark runs (recorded in results.json).

    Checked when made (``__post_init__``), before anything loads: the one place
    bench settings are validated; tree and sampling values by ``TreeSettings``
    and ``SamplingParams`` themselves.

    Raises:
        BenchError: unknown methods, counts below 1, nothing to run.
        ValueError: tree or sampling settings that ``TreeSettings`` /
            ``SamplingParams`` refuse.
    """

    model: str
    data: str
    num_prompts: Optional[int] = None
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    methods: Sequence[str] = DEFAULT_METHODS
    tree_widths: Optional[tuple] = None  # ss tree; None: the checkpoint's default
    max_nodes: Optional[int] = None
    prune_threshold: Optional[float] = None
    sweep_widths: Sequence[tuple] = ()  # with sweep_max_nodes: extra ss settings
    sweep_max_nodes: Sequence[Optional[int]] = ()
    draft_model: Optional[str] = None
    num_draft_tokens: int = 3
    pld_max_ngram: int = 3
    pld_tokens: int = 4
    warmup_tokens: int = 16
    system_prompt: Optional[str] = None
    ignore_chat_template: bool = False
    shard: Optional[str] = None  # "tensor" | "pipeline": across the mlx.launch ranks

    def __post_init__(self):
        from ..shard import check_mode
        from ..verify import SamplingParams

        check_methods(self.methods)
        check_mode(self.shard)
        if self.shard and "draft" in self.methods:
            raise BenchError("draft (mlx-lm's draft-model speculation) is not run with --shard: every rank "
                             "would hold a whole draft model; leave it out of --methods")
        if not self.methods and not self.sweep_widths:
            raise BenchError("no methods to run: give --methods or --sweep")
        at_least_one = {"max_tokens": self.max_tokens, "num_prompts": self.num_prompts,
                        "num_draft_tokens": self.num_draft_tokens,
                        "pld_max_ngram": self.pld_max_ngram, "pld_tokens": self.pld_tokens}
        for name, value in at_least_one.items():
            if value is not None and value < 1:
                raise BenchError(f"{name} must be at least 1, got {value}")
        if self.warmup_tokens < 0:
            raise BenchError(f"warmup_tokens must be >= 0 (0: no warm-up), got {self.warmup_tokens}")
        SamplingParams(temp=self.temp, top_p=self.top_p)
        TreeSettings(self.tree_widths or (), self.max_nodes, self.prune_threshold)
        for widths in self.sweep_widths:
            TreeSettings(widths, None)
        for cap in self.sweep_max_nodes:
            TreeSettings((), cap)


def parse_methods(text: Optional[str]) -> Optional[List[str]]:
    """Method names from ``"ar,ss,pld"``; ``None`` for the default set."""
    if text is None:
        return None
    names = [m for m in text.replace(" ", ",").split(",") if m]
    return check_methods(list(dict.fromkeys(names)) or [text])


def _timed(responses) -> tuple:
    """Consume a response stream: (responses, time to first, first-to-last time)."""
    tic = time.perf_counter()
    first = last = None
    out = []
    for response in responses:
        last = time.perf_counter()
        first = first or last
        out.append(response)
    if not out:
        return out, 0.0, 0.0
    return out, first - tic, last - first


def _output(responses) -> List[int]:
    tokens = [r.token for r in responses]
    if responses and responses[-1].finish_reason == "stop":
        tokens = tokens[:-1]  # the EOS is not part of the text
    return [int(t) for t in tokens]


def _steps_from_flags(flags: Sequence[bool]) -> List[int]:
    """Accepted drafts per target forward from mlx-lm's ``from_draft`` flags."""
    steps, run = [], 0
    for flag in flags:
        if flag:
            run += 1
        else:
            steps.append(run)
            run = 0
    if run:
        steps.append(run)  # cut by max_tokens inside a step
    return steps


def _mlx_lm_runner(base, tokenizer, sampler, draft=None, num_draft: int = 3):
    import mlx_lm
    from mlx_lm.generate import generation_stream

    extra = {} if draft is None else {"draft_model": draft, "num_draft_tokens": num_draft}

    def run(prompt: List[int], max_tokens: int, seed: int) -> Run:
        mx.random.seed(seed)
        responses, ttft, decode_s = _timed(mlx_lm.stream_generate(
            base, tokenizer, prompt, max_tokens, sampler=sampler, **extra))
        # mlx-lm leaves the next token's forward queued on its own stream; let it finish
        # so that no method starts beside it (sharded runs: its collectives would interleave)
        mx.synchronize(generation_stream)
        result = Run(_output(responses), ttft, decode_s, len(responses))
        if draft is None:
            result.forwards = result.forward_tokens = len(responses)
        else:
            steps = _steps_from_flags([r.from_draft for r in responses])
            result.forwards, result.forward_tokens = len(steps), len(responses)
            result.depth_hits = [sum(k > d for k in steps) for d in range(num_draft)]
        return result

    return run


def _ss_runner(model, tokenizer, settings: BenchSettings, **drafting):
    """A runner decoding through this project's loop with ``make_drafter(model, **drafting)``."""
    def run(prompt: List[int], max_tokens: int, seed: int) -> Run:
        responses, ttft, decode_s = _timed(stream_generate(
            model, tokenizer, prompt, max_tokens, temp=settings.temp, top_p=settings.top_p,
            seed=seed, drafter=make_drafter(model, **drafting)))
        last = responses[-1]
        result = Run(_output(responses), ttft, decode_s, len(responses), last.forwards)
        result.forward_tokens = round(last.tokens_per_forward * last.forwards)
        result.depth_hits = [round(a * last.forwards) for a in last.acceptance_by_depth]
        return result

    return run


def tree_label(tree: TreeSettings) -> str:
    """Short name of a tree setting, e.g. ``w=3,2,1 n=16``."""
    label = "w=" + ",".join(str(w) for w in tree.widths)
    label += f" n={tree.max_nodes}" if tree.max_nodes else " n=all"
    return label + (f" p={tree.prune_threshold:g}" if tree.prune_threshold is not None else "")


def _load_baselines(settings: BenchSettings, methods: Sequence[str], model, tokenizer, log):
    """The mlx-lm base model (``ar``, ``draft``) and draft model (``draft``), as needed.

    Both are loaded by mlx-lm from the checkpoint (a plain mlx-lm directory
    too) and cast to the SS model's dtype, so every method computes alike.
    """
    from ..loading import _load_base, load_mlx_lm, resolve_path

    dtype = model.base.model.norm.weight.dtype
    path = resolve_path(settings.model)
    base = draft = None
    if "ar" in methods or "draft" in methods:
        base = load_mlx_lm(str(path), dtype, shard=settings.shard)[0]
    if "draft" in methods:
        if settings.draft_model:
            draft, draft_tokenizer, _, _ = _load_base(resolve_path(settings.draft_model), None)
            if draft_tokenizer.vocab_size != tokenizer.vocab_size:
                raise BenchError(f"--draft-model {settings.draft_model} has another tokenizer "
                                 f"({draft_tokenizer.vocab_size} tokens, the target's "
                                 f"{tokenizer.vocab_size}): use one of the target's family")
        else:
            from mlx_lm.utils import quantize_model

            log("[bench] draft model: a 4-bit quantized copy of the target")
            draft, _, config, _ = _load_base(path, dtype)
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_model(draft, config, 64, 4)
        mx.eval(draft.parameters())
    return base, draft


def ss_tree(settings: BenchSettings, config) -> TreeSettings:
    """The ``ss`` tree: the settings' overrides over the checkpoint's defaults."""
    return tree_settings(config, settings.tree_widths, settings.max_nodes, settings.prune_threshold)


def make_runners(settings: BenchSettings, methods, model, tokenizer, base, draft) -> Dict[str, Callable]:
    """One callable ``(prompt, max_tokens, seed) -> Run`` per method name (sweep included)."""
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=settings.temp, top_p=settings.top_p)
    tree = ss_tree(settings, model.config)
    chain = TreeSettings((1,) * model.config.gamma, None, None)
    lookup = {"lookup": settings.pld_tokens, "lookup_ngram": settings.pld_max_ngram}
    runners = {}
    for name in methods:
        if name == "ar":
            runners[name] = _mlx_lm_runner(base, tokenizer, sampler)
        elif name == "draft":
            runners[name] = _mlx_lm_runner(base, tokenizer, sampler, draft, settings.num_draft_tokens)
        elif name == "ss":
            runners[name] = _ss_runner(model, tokenizer, settings, tree=tree)
        elif name == "ss-chain":
            runners[name] = _ss_runner(model, tokenizer, settings, tree=chain)
        elif name == "pld":
            runners[name] = _ss_runner(model, tokenizer, settings, speculative=False, **lookup)
        elif name == "ss-pld":
            runners[name] = _ss_runner(model, tokenizer, settings, tree=tree, **lookup)
        elif name in ("medusa", "eagle"):  # the checkpoint's peer heads, same tree and verification
            runners[name] = _ss_runner(model, tokenizer, settings, tree=tree, source=name)
    for sweep_tree in sweep_settings(settings.sweep_widths, settings.sweep_max_nodes,
                                     model.config.gamma):
        runners[f"ss {tree_label(sweep_tree)}"] = _ss_runner(model, tokenizer, settings,
                                                             tree=sweep_tree)
    return runners


def _measured(runner, prompt, max_tokens, seed, own_bytes: int, sharded: bool = False) -> Run:
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    if sharded:
        from ..shard import counting_collectives

        with counting_collectives() as counts:
            result = runner(prompt, max_tokens, seed)
        result.collectives = sum(counts.values())
    else:
        result = runner(prompt, max_tokens, seed)
    result.peak_memory_gb = (own_bytes + max(mx.get_peak_memory() - before, 0)) / 1e9
    return result


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_bench(settings: BenchSettings, device_report: bool = False,
              log: Callable[[str], None] = _stderr) -> dict:
    """Load the models, run every method on every prompt, return the results.

    Args:
        settings: what to run.
        device_report: also measure memory bandwidth and the speed bound.
        log: progress lines go here.

    Returns:
        The results (``results.json`` without ``command``): ``settings``,
        ``environment``, ``mode``, ``methods`` (``summarize``), ``prompts``
        (per-prompt runs with tokens), ``sweep`` and, if asked, ``device``.

    Raises:
        BenchError: bad prompts; plus ``loading``'s errors for bad checkpoints
            (the settings were checked when ``settings`` was made).
    """
    methods = list(settings.methods)  # checked by BenchSettings
    log(f"[bench] loading {settings.model}")
    from ..loading import load

    model, tokenizer = load(settings.model, shard=settings.shard)
    prompts = load_prompts(settings.data, tokenizer, settings.num_prompts, settings.max_tokens,
                           max_context(model), settings.system_prompt, settings.ignore_chat_template)
    base, draft = _load_baselines(settings, methods, model, tokenizer, log)
    runners = make_runners(settings, methods, model, tokenizer, base, draft)
    from .env import device_report as measure_device, environment, weight_bytes

    own = {name: weight_bytes(model.base if name not in ("ar", "draft") else base)
           + (weight_bytes(draft) if name == "draft" else 0) for name in runners}
    names = list(runners)
    warm = min(settings.warmup_tokens, settings.max_tokens)
    for name in names:
        if warm:  # --warmup-tokens 0: none
            log(f"[bench] warm-up {name} ({warm} tokens)")
            runners[name](prompts[0].tokens, warm, settings.seed)
    runs: Dict[str, List[Run]] = {name: [] for name in names}
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(_measured(runners[name], prompt.tokens, settings.max_tokens,
                                        settings.seed + index, own[name], settings.shard is not None))
        elapsed = time.perf_counter() - start
        left = elapsed / (index + 1) * (len(prompts) - index - 1)
        log(f"[bench] prompt {index + 1}/{len(prompts)} (line {prompt.line}, "
            f"{len(prompt.tokens)} tokens): " + ", ".join(
                f"{n} {_fmt(runs[n][-1].tps)}" for n in names) + f" tok/s; ~{left:.0f} s left")
    lossless = not model.config.shared
    dtype = str(model.base.model.norm.weight.dtype).replace("mlx.core.", "")
    results = {
        "settings": _settings_dict(settings, model),
        "environment": environment(dtype),
        "mode": model.config.mode,
        "methods": summarize(runs, settings.temp == 0, lossless),
        "prompts": [{"line": p.line, "prompt_tokens": len(p.tokens), "runs": {
            n: {"tokens": runs[n][i].tokens, "tps": runs[n][i].tps, "ttft_s": runs[n][i].ttft_s,
                "forwards": runs[n][i].forwards, "peak_memory_gb": runs[n][i].peak_memory_gb}
            for n in names}} for i, p in enumerate(prompts)],
        "sweep": [{"name": f"ss {tree_label(t)}", "widths": list(t.widths),
                   "max_nodes": t.max_nodes, "prune_threshold": t.prune_threshold,
                   "nodes": build_tree(t.widths, t.max_nodes).size}
                  for t in sweep_settings(settings.sweep_widths, settings.sweep_max_nodes,
                                          model.config.gamma)],
    }
    if device_report:
        log("[bench] measuring memory bandwidth")
        results["device"] = measure_device(model.base, dtype)
    return results


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _settings_dict(settings: BenchSettings, model) -> dict:
    data = dict(vars(settings))
    tree = ss_tree(settings, model.config)
    data["methods"] = list(settings.methods)
    data["sweep_widths"] = [list(w) for w in settings.sweep_widths]
    data["sweep_max_nodes"] = list(settings.sweep_max_nodes)
    data["tree_widths"] = None if settings.tree_widths is None else list(settings.tree_widths)
    data["tree"] = {"widths": list(tree.widths), "max_nodes": tree.max_nodes,
                    "prune_threshold": tree.prune_threshold}
    data["gamma"] = model.config.gamma
    data["ranks"] = model.sharding[1].size() if model.sharding else 1
    data["dtype"] = str(model.base.model.norm.weight.dtype).replace("mlx.core.", "")
    return data


def sweep_settings(widths: Sequence[tuple], max_nodes: Sequence[Optional[int]], gamma: int) -> List[TreeSettings]:
    """Tree settings of a sweep: every widths x node cap, one per distinct tree.

    Widths deeper than ``gamma`` are cut. A cap at or above the full tree's
    size is the uncapped tree, and settings that build the same tree (a cap of
    4 on ``3,2,1`` is the chain ``1,1,1``) count once, under the uncapped name
    when there is one. Ordered by tree size.
    """
    shapes = list(dict.fromkeys(tuple(w)[:gamma] for w in widths))
    candidates = [(w, None) for w in shapes]
    candidates += [(w, cap) for w in shapes for cap in max_nodes
                   if cap is not None and cap < build_tree(w).size]
    out, seen = [], set()
    for w, cap in candidates:
        tree = build_tree(w, cap)
        key = (tuple(tree.parents), tuple(tree.rank))
        if key not in seen:
            seen.add(key)
            out.append((tree.size, len(out), TreeSettings(w, cap, None)))
    return [setting for _, _, setting in sorted(out, key=lambda t: t[:2])]


__all__ = ["BenchSettings", "BenchError", "METHODS", "run_bench", "load_prompts",
           "check_methods", "parse_methods", "sweep_settings", "summarize", "tree_label"]
