"""Shared mode: exact against its own one-token decoding, and really different from the base."""

import mlx.core as mx
import numpy as np
import pytest

from .helpers import decode_tokens, random_prompt, ss_model
from specstream_mlx.cache import make_cache
from specstream_mlx.config import TreeSettings
from specstream_mlx.forward import forward, logits
from specstream_mlx.masks import chain_rows


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("widths", [(1, 1, 1), (3, 2, 1)])
def test_shared_mode_equals_its_own_one_token_decoding(family, widths):
    model = ss_model(family, mode="shared")
    prompt = random_prompt(30, seed=3)
    plain, _ = decode_tokens(model, prompt, 30, speculative=False, prefill_step_size=16)
    spec, steps = decode_tokens(model, prompt, 30, tree=TreeSettings(widths, None),
                                prefill_step_size=16)
    assert spec == plain


def test_shared_mode_differs_from_base():
    """Main rows really see their streams in shared mode (else the test above is vacuous)."""
    shared = ss_model("llama", mode="shared")
    lossless = ss_model("llama", mode="lossless")
    prompt = random_prompt(30, seed=3)
    out_s = forward(shared, mx.array(prompt), chain_rows(30, np.arange(30)), make_cache(4))
    out_l = forward(lossless, mx.array(prompt), chain_rows(30, np.arange(30)), make_cache(4))
    diff = mx.abs(logits(shared, out_s.main_hidden) - logits(lossless, out_l.main_hidden)).max()
    assert diff.item() > 1e-3
