"""Headline invariant: lossless greedy Speculative Streaming equals plain greedy decoding.

Every supported family, untrained (random) streams, several tree shapes, short
and long prompts, and lengths that end mid-tree. The reference is mlx-lm's own
``generate_step`` on the same base model.
"""

import functools

import numpy as np
import pytest

from .helpers import FAMILIES, decode_tokens, random_prompt, reference_tokens, ss_model
from specstream_mlx.config import TreeSettings

SHAPES = {
    "chain": TreeSettings((1, 1, 1), None),
    "wide": TreeSettings((5,), None),
    "deep": TreeSettings((3, 2, 2), 12),
    "pruned-threshold": TreeSettings((3, 2, 1), None, prune_threshold=2e-3),
    "pruned-cap": TreeSettings((3, 3, 1), None, prune_threshold=0.0, prune_max_keep=5),
}


@functools.lru_cache(maxsize=None)
def _model(family):
    return ss_model(family)


@functools.lru_cache(maxsize=None)
def _reference(family, prompt_len, max_tokens, seed=0):
    return reference_tokens(_model(family).base, random_prompt(prompt_len, seed), max_tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_equals_mlx_lm(family, shape):
    prompt = random_prompt(24)
    expected = _reference(family, 24, 40)
    tokens, steps = decode_tokens(_model(family), prompt, 40, tree=SHAPES[shape])
    assert tokens == expected
    # The prefill emits one token; each later forward its accepted drafts (at most the tree's
    # depth) plus one; decoding stops at the first forward that reaches 40 tokens (its extra
    # accepted drafts are cut by the caller). So the step count is 40 less the accepted drafts,
    # plus that overshoot.
    assert steps[0].prefill and steps[0].tokens == expected[:1]
    depth = len(SHAPES[shape].widths)
    assert all(not s.prefill and len(s.tokens) == s.accepted + 1 <= depth + 1 for s in steps[1:])
    emitted = np.cumsum([len(s.tokens) for s in steps])
    assert emitted[-2] < 40 <= emitted[-1]
    overshoot = int(emitted[-1]) - 40
    assert overshoot <= steps[-1].accepted
    assert len(steps) == 40 - sum(s.accepted for s in steps) + overshoot
    if shape.startswith("pruned"):
        full = {"pruned-threshold": 10, "pruned-cap": 13}[shape]
        assert any(0 < s.tree_size < full for s in steps), "pruning never removed a node"


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
@pytest.mark.parametrize("prompt_len", [1, 2, 9, 300])
def test_prompt_lengths(family, prompt_len):
    # 300 tokens in chunks of 64 exercise chunked prefill and, for Gemma 3,
    # a sliding window (8) far shorter than the context.
    expected = _reference(family, prompt_len, 24)
    tokens, _ = decode_tokens(
        _model(family), random_prompt(prompt_len), 24,
        tree=TreeSettings((2, 2, 1), None), prefill_step_size=64,
    )
    assert tokens == expected


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13])
def test_lengths_ending_mid_tree(max_tokens):
    family = "qwen2"
    expected = _reference(family, 24, 40)[:max_tokens]
    tokens, steps = decode_tokens(_model(family), random_prompt(24), max_tokens,
                                  tree=TreeSettings((3, 2, 1), None))
    assert tokens == expected
    emitted = sum(len(s.tokens) for s in steps)
    assert emitted - len(steps[-1].tokens) < max_tokens <= emitted


def test_no_spec_matches_and_uses_one_forward_per_token():
    expected = _reference("llama", 24, 20)
    tokens, steps = decode_tokens(_model("llama"), random_prompt(24), 20, speculative=False)
    assert tokens == expected
    assert all(len(s.tokens) == 1 for s in steps)


def test_drafts_are_accepted_somewhere():
    """Random streams still hit sometimes; otherwise the tree path is untested."""
    accepted = 0
    for family in FAMILIES:
        _, steps = decode_tokens(_model(family), random_prompt(24), 40,
                                 tree=TreeSettings((5, 2, 2), None))
        accepted += sum(s.accepted for s in steps)
    assert accepted > 0


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_stream_adapters_keep_exactness(mode):
    """Adapters act on stream rows only: lossless output stays the base model's."""
    model = ss_model("qwen3", mode=mode, adapter_rank=8)
    prompt = random_prompt(20, seed=7)
    plain, _ = decode_tokens(model, prompt, 30, speculative=False)
    spec, _ = decode_tokens(model, prompt, 30, tree=TreeSettings((3, 2, 1), None))
    assert spec == plain
    if mode == "lossless":
        assert spec == reference_tokens(model.base, prompt, 30)
