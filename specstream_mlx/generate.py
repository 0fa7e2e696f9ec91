"""The embeddable API: ``stream_generate`` and ``generate``, mlx-lm style."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .decode import ContextOverflowError, decode
from .drafters import Drafter, make_drafter
from .model import SpecStreamModel
from .verify import SamplingParams


@dataclass
class GenerationResponse:
    """One piece of output from ``stream_generate`` (one token).

    Attributes:
        text: the next segment of decoded text (may be empty).
        token: the token id.
        from_draft: the token was a drafted token accepted by verification.
        prompt_tokens, prompt_tps: prompt length and prefill speed.
        generation_tokens, generation_tps: tokens so far and decode speed.
        peak_memory: peak memory so far, in GB.
        forwards: decode forwards so far (the prefill not counted).
        tokens_per_forward: tokens emitted per decode forward (1.0 without drafts).
        acceptance_by_depth: for depth ``d`` (index ``d - 1``), the fraction of
            decode forwards that accepted at least ``d`` drafted tokens.
        finish_reason: ``"stop"``, ``"length"`` or ``None`` while generating.
    """

    text: str
    token: int
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    forwards: int = 0
    tokens_per_forward: float = 0.0
    acceptance_by_depth: List[float] = field(default_factory=list)
    finish_reason: Optional[str] = None

    def stats(self) -> dict:
        """The figures ``--stats-json`` writes."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_tps": self.prompt_tps,
            "generation_tokens": self.generation_tokens,
            "generation_tps": self.generation_tps,
            "forwards": self.forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_by_depth": self.acceptance_by_depth,
            "peak_memory_gb": self.peak_memory,
            "finish_reason": self.finish_reason,
        }


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> List[int]:
    """Token ids of a prompt, adding BOS as mlx-lm does for text prompts."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
    elif isinstance(prompt, mx.array):
        tokens = prompt.reshape(-1).tolist()
    else:
        tokens = [int(t) for t in prompt]
    if len(tokens) == 0:
        raise ValueError("the prompt is empty: give some text or token ids")
    return tokens


def max_context(model: SpecStreamModel) -> Optional[int]:
    """The base model's context length from its config, when it states one."""
    return getattr(model.base.args, "max_position_embeddings", None)


def _sampling(sampling: Optional[SamplingParams], **loose) -> SamplingParams:
    """``sampling`` or a ``SamplingParams`` from the mlx-lm-style keywords."""
    given = {k: v for k, v in loose.items() if v is not None}
    if sampling is None:
        return SamplingParams(**given)
    if given:
        raise ValueError(f"give either sampling=SamplingParams(...) or the keywords "
                         f"{', '.join(given)}, not both")
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    return sampling


def stream_generate(
    model: SpecStreamModel,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    *,
    sampling: Optional[SamplingParams] = None,
    temp: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    seed: Optional[int] = None,
    drafter: Optional[Drafter] = None,
    prefill_step_size: int = 512,
) -> Iterator[GenerationResponse]:
    """Generate text token by token with Speculative Streaming.

    Args:
        model: a ``SpecStreamModel`` from ``load``.
        tokenizer: the tokenizer from ``load``.
        prompt: text (encoded with BOS as mlx-lm does) or token ids.
        max_tokens: maximum number of tokens to generate (> 0).
        sampling: the sampling settings (``verify.SamplingParams``); ``None``:
            greedy, or the loose keywords below.
        temp, top_p, top_k, min_p: mlx-lm-style keywords, the same settings
            one by one (``temp=0``: greedy; see ``SamplingParams`` for what
            "off" means). Give these or ``sampling``, not both.
        seed: seed for ``mx.random`` (sampling), or ``None`` to leave it.
        drafter: where drafts come from, from ``drafters.make_drafter`` (a
            tree, prompt lookup, or ``speculative=False`` for plain decoding);
            ``None``: the streams with the checkpoint's tree for this backend.
        prefill_step_size: prompt chunk size.

    Yields:
        ``GenerationResponse`` per generated token; the last has ``finish_reason``.

    Raises:
        ValueError: empty prompt, ``max_tokens < 1``, bad sampling settings,
            ``sampling`` given together with any of ``temp``/``top_p``/``top_k``/``min_p``.
        ContextOverflowError: prompt plus ``max_tokens`` exceeds the context.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    sampling = _sampling(sampling, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    tokens = encode_prompt(tokenizer, prompt)
    if drafter is None:
        drafter = make_drafter(model)
    if model.sharding is not None:  # every rank the same seed, tokens and drafts (checked)
        from .shard import RankCheck, agree_seed, check_prompt_fits

        world = model.sharding[1]
        check_prompt_fits(tokens, max_tokens, max_context(model), world)
        agree_seed(seed, world)
        drafter = RankCheck(drafter, world)
    elif seed is not None:
        mx.random.seed(seed)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = decode(model, tokens, max_tokens, sampling, drafter, prefill_step_size,
                   max_context(model))

    tic = time.perf_counter()
    prompt_tps = 0.0
    generated, forwards, used_from_forwards = 0, 0, 0
    depth_hits: List[int] = [0] * drafter.max_depth
    for step in steps:
        if step.prefill:
            prompt_tps = len(tokens) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        else:
            forwards += 1
            for d in range(min(step.accepted, len(depth_hits))):
                depth_hits[d] += 1
        for position, token in enumerate(step.tokens):
            finish = None
            used_from_forwards += 0 if step.prefill else 1
            if token in eos:
                finish = "stop"
            elif generated + 1 >= max_tokens:
                finish = "length"
            if finish != "stop":
                generated += 1
                detokenizer.add_token(token)
            if finish is not None:
                detokenizer.finalize()
            elapsed = max(time.perf_counter() - tic, 1e-9)
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                from_draft=position < step.accepted,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=generated,
                generation_tps=generated / elapsed if forwards else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                forwards=forwards,
                tokens_per_forward=used_from_forwards / forwards if forwards else 0.0,
                acceptance_by_depth=[h / forwards if forwards else 0.0 for h in depth_hits],
                finish_reason=finish,
            )
            if finish is not None:
                return
    # decode() stops only at max_tokens, which the loop above ends on.


def generate(
    model: SpecStreamModel,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response (see ``stream_generate`` for the options).

    Args:
        model, tokenizer: from ``load``.
        prompt: text or token ids.
        max_tokens: maximum number of tokens.
        verbose: print text as it comes, then the statistics.

    Returns:
        The generated text.
    """
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_stats(r: GenerationResponse) -> str:
    """mlx-lm-style statistics lines plus the speculative figures."""
    depth = ", ".join(f"d{i + 1}={a:.2f}" for i, a in enumerate(r.acceptance_by_depth))
    return "\n".join([
        "=" * 10,
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
        f"Forwards: {r.forwards}, tokens per forward: {r.tokens_per_forward:.3f}"
        + (f", acceptance by depth: {depth}" if depth else ""),
        f"Peak memory: {r.peak_memory:.3f} GB",
    ])


__all__ = ["GenerationResponse", "SamplingParams", "stream_generate", "generate",
           "ContextOverflowError"]
