"""Overlapped greedy chain decoding (``overlap``): the same tokens as mlx-lm, holes and all.

Random streams rarely guess right, so an oracle replaces the streams' drafts with
the reference continuation, corrupted at chosen depths: every acceptance count
from 0 to the chain's length occurs, which exercises the slot holes, the
device-side acceptance and (with a small ``max_holes``) compaction.
"""

import functools

import mlx.core as mx
import numpy as np
import pytest

from .helpers import decode_tokens, random_prompt, reference_tokens, ss_model
from specstream_mlx import overlap
from specstream_mlx.config import TreeSettings
from specstream_mlx.drafters import make_drafter
from specstream_mlx.verify import SamplingParams

CHAIN = TreeSettings((1, 1, 1), None)


@functools.lru_cache(maxsize=None)
def _model(family, mode="lossless"):
    return ss_model(family, mode=mode)


def _oracle(sequence, depth, wrong_at):
    """``next_drafts`` that drafts the true continuation, wrong at depth ``wrong_at[step % len]``."""
    truth = mx.array(sequence + [0] * 16, mx.int32)
    calls = []

    def next_drafts(self, guesses, accepted):
        k = len(calls)
        calls.append(k)
        drafts = mx.take(truth, self.position + 1 + mx.arange(depth))  # (d,) after the new root
        bad = wrong_at[k % len(wrong_at)]
        if bad < depth:  # a wrong token at depth `bad`: exactly `bad` drafts can be accepted
            drafts = mx.where(mx.arange(depth) == bad, (drafts + 1) % 256, drafts)
        return drafts

    return next_drafts, calls


@pytest.fixture
def overlap_on(monkeypatch):
    monkeypatch.setenv(overlap.ENV, "1")


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("max_holes", [256, 2])
def test_oracle_drafts_equal_mlx_lm(family, max_holes, overlap_on, monkeypatch):
    model = _model(family)
    prompt = random_prompt(24)
    truth = reference_tokens(model.base, prompt, 60)  # drafts may look past token 48
    expected = truth[:48]
    wrong_at = [3, 0, 1, 2, 3, 3, 2, 0]
    hook, calls = _oracle(prompt + truth, 3, wrong_at)
    monkeypatch.setattr(overlap.ChainDecoder, "next_drafts", hook)
    monkeypatch.setattr(overlap, "MAX_HOLES", max_holes)
    tokens, steps = decode_tokens(model, prompt, 48, tree=CHAIN)
    assert tokens == expected
    # The first forward verifies the streams' own (random) drafts; from then on step k
    # verifies the oracle's drafts of call k - 1, wrong at depth wrong_at[(k - 1) % 8].
    accepted = [s.accepted for s in steps[2:]]
    assert accepted == [min(wrong_at[k % len(wrong_at)], 3) for k in range(len(accepted))]
    assert set(accepted) == {0, 1, 2, 3}
    assert all(s.tree_size == 4 for s in steps[1:])
    assert len(calls) >= len(steps) - 1  # one step was queued beyond the last


def test_compaction_happens_and_keeps_tokens(overlap_on, monkeypatch):
    model = _model("llama")
    prompt = random_prompt(9, seed=3)
    truth = reference_tokens(model.base, prompt, 50)
    expected = truth[:40]
    hook, _ = _oracle(prompt + truth, 3, [0, 1])  # many holes: 3 or 2 dead slots a step
    monkeypatch.setattr(overlap.ChainDecoder, "next_drafts", hook)
    monkeypatch.setattr(overlap, "MAX_HOLES", 4)
    compactions = []
    original = overlap.ChainDecoder.compact

    def counting(self):
        compactions.append(self.used)
        original(self)
        assert self.used == self.committed  # only committed tokens' slots survive

    monkeypatch.setattr(overlap.ChainDecoder, "compact", counting)
    tokens, _ = decode_tokens(model, prompt, 40, tree=CHAIN)
    assert tokens == expected
    assert len(compactions) >= 3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_same_steps_as_decode(family, mode, monkeypatch):
    # The model's own streams: the overlapped path must take exactly decode's steps.
    model = _model(family, mode)
    prompt = random_prompt(30, seed=1)
    monkeypatch.setenv(overlap.ENV, "0")
    plain, plain_steps = decode_tokens(model, prompt, 33, tree=TreeSettings((1, 1), None))
    monkeypatch.setenv(overlap.ENV, "1")
    fast, fast_steps = decode_tokens(model, prompt, 33, tree=TreeSettings((1, 1), None))
    assert fast == plain
    assert [(s.tokens, s.accepted, s.tree_size) for s in fast_steps] == \
        [(s.tokens, s.accepted, s.tree_size) for s in plain_steps]


def test_eligible_only_for_greedy_stream_chains(monkeypatch):
    model = _model("llama")
    chain = make_drafter(model, CHAIN)
    monkeypatch.setenv(overlap.ENV, "0")
    assert not overlap.eligible(model, chain, greedy=True)  # off unless asked for
    monkeypatch.setenv(overlap.ENV, "1")
    assert overlap.eligible(model, chain, greedy=True)
    assert not overlap.eligible(model, chain, greedy=False)
    assert not overlap.eligible(model, make_drafter(model, TreeSettings((2, 1), None)), True)
    assert not overlap.eligible(model, make_drafter(model, CHAIN, lookup=3), True)
    assert not overlap.eligible(model, make_drafter(model, speculative=False), True)
    pruned = TreeSettings((1, 1, 1), None, prune_threshold=1e-3)
    assert not overlap.eligible(model, make_drafter(model, pruned), True)
    windowed = _model("gemma3_text")  # sliding-window layers: decode's masks handle those
    assert not overlap.eligible(windowed, make_drafter(windowed, CHAIN), True)


def test_bad_setting_is_one_clear_error(monkeypatch):
    model = _model("llama")
    monkeypatch.setenv(overlap.ENV, "yes")
    with pytest.raises(ValueError, match="SPECSTREAM_OVERLAP='yes'.*set it to 1"):
        decode_tokens(model, random_prompt(8), 4, tree=CHAIN)


def test_sampling_is_left_to_decode(overlap_on, monkeypatch):
    model = _model("llama")
    from specstream_mlx.decode import decode

    def refuse(*args, **kwargs):
        raise AssertionError("sampling must not take the overlapped greedy path")

    monkeypatch.setattr(overlap, "ChainDecoder", refuse)
    mx.random.seed(5)
    steps = list(decode(model, random_prompt(12), 12, SamplingParams(temp=1.0),
                        make_drafter(model, CHAIN)))
    assert sum(len(s.tokens) for s in steps) >= 12
    with pytest.raises(AssertionError, match="overlapped"):  # and greedy does take it
        list(decode(model, random_prompt(12), 12, SamplingParams(), make_drafter(model, CHAIN)))
