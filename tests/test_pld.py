"""Prompt-lookup decoding: the n-gram lookup on literal cases, and decoding through it."""

import numpy as np
import pytest

from .helpers import decode_tokens, ss_model
from specstream_mlx import decode as decode_module
from specstream_mlx.drafters import PromptLookupDrafter, find_draft


@pytest.mark.parametrize("history, kwargs, want", [
    # the 3-gram [4, 1, 2] never occurred; the 2-gram [1, 2] did, at 0
    ([1, 2, 3, 4, 1, 2], {}, [3, 4, 1, 2]),
    # the most recent earlier match wins (at 3, not at 0)
    ([5, 6, 7, 5, 6, 8, 5, 6], {}, [8, 5, 6]),
    # a longer n-gram beats a more recent shorter one...
    ([7, 1, 2, 10, 1, 2, 11, 7, 1, 2], {}, [10, 1, 2, 11]),
    # ...unless it is not looked up
    ([7, 1, 2, 10, 1, 2, 11, 7, 1, 2], {"max_ngram": 2}, [11, 7, 1, 2]),
    # num_tokens caps the draft
    ([1, 2, 3, 4, 5, 1, 2], {"num_tokens": 2}, [3, 4]),
    # min_ngram=2 refuses a unigram match
    ([1, 2, 3, 1], {"min_ngram": 2}, []),
    ([1, 2, 3, 1], {}, [2, 3, 1]),
    # the tail is never its own match, but may overlap one
    ([1, 2], {}, []),
    ([4, 4], {}, [4]),
    ([4, 4, 4], {}, [4]),
    ([], {}, []),
    ([9], {}, []),
    ([1, 2, 1], {"num_tokens": 0}, []),
])
def test_find_draft_literal_cases(history, kwargs, want):
    assert find_draft(history, **kwargs) == want


@pytest.mark.parametrize("kwargs", [{"min_ngram": 0}, {"max_ngram": 1, "min_ngram": 2},
                                    {"num_tokens": -1}])
def test_find_draft_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="n-gram"):
        find_draft([1, 2, 3], **kwargs)


def _record_rows(monkeypatch):
    seen = []
    real = decode_module.forward

    def spy(model, tokens, rows, cache, **kwargs):
        seen.append((rows.size, rows.stream_nodes.copy(), rows.is_chain))
        return real(model, tokens, rows, cache, **kwargs)

    monkeypatch.setattr(decode_module, "forward", spy)
    return seen


def test_pld_greedy_equals_plain_and_runs_no_stream_rows(monkeypatch):
    model = ss_model("llama", seed=4)
    # A repetitive prompt: tiny random models tend to loop too, so drafts hit.
    prompt = [10, 20, 30, 40, 50] * 6
    plain, _ = decode_tokens(model, prompt, 40, speculative=False)
    seen = _record_rows(monkeypatch)
    drafter = PromptLookupDrafter(model, max_ngram=3, num_tokens=4)
    tokens, steps = decode_tokens(model, prompt, 40, drafter=drafter)
    assert tokens == plain
    assert sum(s.accepted for s in steps) > 0, "no draft was accepted: the test shows nothing"
    assert len(steps) - 1 < 39  # fewer forwards than tokens
    assert any(size > 1 for size, _, _ in seen[1:])
    assert all(nodes.size == 0 for _, nodes, _ in seen), "PLD must not run stream rows"
    assert all(chain for _, _, chain in seen[1:]), "a PLD draft is a chain"
    # drafts never run past the token budget (root + drafts <= tokens still wanted)
    emitted = 1
    for (size, _, _), step in zip(seen[1:], steps[1:]):
        assert size <= 40 - emitted
        emitted += len(step.tokens)


def test_pld_in_shared_mode_runs_no_stream_rows(monkeypatch):
    """No main row sees a stream (either mode), so a lookup chain needs no stream rows."""
    model = ss_model("qwen2", mode="shared", seed=5)
    prompt = [7, 8, 9] * 8
    plain, _ = decode_tokens(model, prompt, 24, speculative=False)
    seen = _record_rows(monkeypatch)
    tokens, _ = decode_tokens(model, prompt, 24, drafter=PromptLookupDrafter(model))
    assert tokens == plain
    assert len(seen) > 1 and all(len(nodes) == 0 for _, nodes, _ in seen)


@pytest.mark.parametrize("mode, widths", [("lossless", (1,)), ("lossless", (2, 1)), ("shared", (1, 1))])
def test_streams_plus_lookup_equal_plain_decoding(monkeypatch, mode, widths):
    from specstream_mlx.config import TreeSettings
    from specstream_mlx.tree import build_tree
    from specstream_mlx.drafters import StreamLookupDrafter

    model = ss_model("llama", mode=mode, seed=4)
    prompt = [10, 20, 30, 40, 50] * 6
    plain, _ = decode_tokens(model, prompt, 40, speculative=False)
    seen = _record_rows(monkeypatch)
    drafter = StreamLookupDrafter(model, TreeSettings(widths, None), num_tokens=4)
    tokens, steps = decode_tokens(model, prompt, 40, drafter=drafter)
    assert tokens == plain
    stream_rows = build_tree(widths).size
    assert any(size > stream_rows for size, _, _ in seen[1:]), "no lookup chain was grafted"
    assert sum(s.accepted for s in steps) > 0
    # every node runs stream rows: the accepted path's last node drafts the next tree
    assert all(np.array_equal(nodes, np.arange(size)) for size, nodes, _ in seen[1:])
