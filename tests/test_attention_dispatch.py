"""Attention dispatch: reference on this CPU, the env switch, and the fused path end to end.

No GPU here, so the end-to-end fused tests plug the CPU emulator of the Metal
kernel in as the fused implementation (``attention.fused_override``): the
runtime then hands every tree / multi-stream attention call, through the
``TreeMask`` and the ``StepView`` buffers, to the kernel source.
"""

from __future__ import annotations

import sys
from unittest.mock import patch

import mlx.core as mx
import numpy as np
import pytest

from .helpers import CONFIGS, base_model, random_prompt, reference_tokens
from .kernel_cases import get_emulator
from specstream_mlx import attention
from specstream_mlx.cache import make_cache
from specstream_mlx.config import SpecStreamConfig, TreeSettings
from specstream_mlx.config import TreeSettings
from specstream_mlx.decode import decode
from specstream_mlx.drafters import make_drafter
from specstream_mlx.masks import tree_rows
from specstream_mlx.families import family_for
from specstream_mlx.config import PruneSettings
from specstream_mlx.forward import forward, logits
from specstream_mlx.kernels_metal import emulator
from specstream_mlx.masks import chain_rows
from specstream_mlx.model import SpecStreamModel
from specstream_mlx.tree import build_tree

# Head dim 64 (a size the fused kernel serves), 2 query heads per kv head.
WIDE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def wide_model(family: str, seed: int = 0, mode: str = "lossless") -> SpecStreamModel:
    """A random ``SpecStreamModel`` of ``family`` with head dim 64 and GQA 2."""
    extra = {"head_dim": 64, "query_pre_attn_scalar": 64} if "head_dim" in CONFIGS[family] else {}
    key = f"{family}-wide"
    with patch.dict(CONFIGS, {key: dict(CONFIGS[family], **WIDE, **extra)}):
        base, config = base_model(key, seed)
    ss = SpecStreamConfig(gamma=3, stream_layers=2, mode=mode, hidden_size=128,
                          vocab_size=config["vocab_size"], num_layers=4,
                          tree=TreeSettings(widths=(2, 1), max_nodes=4))
    model = SpecStreamModel(base, ss, family_for(config["model_type"]))
    model.stream_embeddings = mx.random.normal((3, 128), key=mx.random.key(seed)) * 0.5
    mx.eval(model.parameters())
    return model


def emulated(counter=None):
    run = emulator.emulated_tree_attention(get_emulator("metal"), max_threads=64)

    def impl(*args):
        if counter is not None:
            counter.append(args[0].shape)
        return run(*args)

    return impl


def tree_forward(model, prompt, tree, prune=None):
    """Prefill ``prompt`` then one tree forward; main and stream logits."""
    cache = make_cache(model.num_layers)
    forward(model, mx.array(prompt), chain_rows(len(prompt)), cache)
    from specstream_mlx.cache import commit

    commit(cache, np.arange(len(prompt)), None, model.num_layers)
    tokens = mx.array(np.arange(tree.size) + 3)
    out = forward(model, tokens, tree_rows(tree), cache, tree=tree, prune=prune)
    if prune is not None:
        assert out.kept is not None and out.kept.size == prune.max_keep
    return logits(model, out.main_hidden), logits(model, out.stream_hidden)


def test_cpu_dispatch_takes_the_reference(monkeypatch):
    monkeypatch.delenv(attention.ENV, raising=False)
    model = wide_model("llama")
    assert attention.is_installed(model.base)
    assert attention.fused_impl() is None  # no Metal/CUDA on this machine
    mask = attention.layer_mask(model.base, np.tril(np.ones((3, 3), bool)), 5,
                                np.array([0, 1, 1]), None, False, lambda: None)
    assert isinstance(mask, mx.array)  # the dense mask, as before


def test_non_tree_calls_are_mlx_lm_unchanged():
    model = wide_model("llama")
    module = sys.modules[type(model.base).__module__]
    dispatch = module.scaled_dot_product_attention
    assert dispatch is not attention._reference
    q, k, v = (mx.random.normal((1, 2, 5, 64), key=mx.random.key(i)) for i in range(3))
    for mask in (None, "causal", mx.random.uniform(shape=(5, 5)) > 0.3):
        got = dispatch(q, k, v, cache=None, scale=0.125, mask=mask)
        want = attention._reference(q, k, v, cache=None, scale=0.125, mask=mask)
        assert mx.array_equal(got, want)
    # and mlx-lm's own decoding through the patched module still works
    assert len(reference_tokens(model.base, random_prompt(6), 4)) == 4


def test_install_is_idempotent_and_reversible():
    model = wide_model("qwen2")
    module = sys.modules[type(model.base).__module__]
    first = module.scaled_dot_product_attention
    attention.install(model.base)
    assert module.scaled_dot_product_attention is first
    attention.uninstall(model.base)
    assert not attention.is_installed(model.base)
    attention.install(model.base)
    assert attention.is_installed(model.base)


def test_bad_env_value_says_what_to_do(monkeypatch):
    monkeypatch.setenv(attention.ENV, "fast")
    with pytest.raises(ValueError, match="auto, reference, fused"):
        attention.mode()


def test_forced_fused_without_a_kernel_raises(monkeypatch):
    monkeypatch.setenv(attention.ENV, "fused")
    model = wide_model("llama")
    with pytest.raises(RuntimeError, match="fused"):
        tree_forward(model, random_prompt(5), build_tree((2, 1)))


def test_forced_reference_never_calls_the_kernel(monkeypatch):
    monkeypatch.setenv(attention.ENV, "reference")
    model = wide_model("llama")

    def boom(*args):
        raise AssertionError("fused kernel called under SPECSTREAM_ATTENTION=reference")

    with attention.fused_override(boom):
        tree_forward(model, random_prompt(5), build_tree((2, 1)))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_tree_forward_with_emulated_kernel_matches_reference(monkeypatch, family):
    """Main and stream logits of a tree forward agree (gemma3: sliding window 8 bites)."""
    monkeypatch.setenv(attention.ENV, "auto")
    model = wide_model(family, seed=1)
    prompt = random_prompt(11, seed=2)
    tree = build_tree((2, 2), max_nodes=6)
    ref_main, ref_streams = tree_forward(model, prompt, tree)
    calls = []
    with attention.fused_override(emulated(calls)):
        main, streams = tree_forward(model, prompt, tree)
    # Every layer of the tree forward, none of the plain prefill (even where
    # gemma3's window of 8 bites into the 11-token prompt).
    assert [c[2] for c in calls] == [tree.size] * 2 + [tree.size * 4] * 2
    np.testing.assert_allclose(np.array(main), np.array(ref_main), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(streams), np.array(ref_streams), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family,seed", [("llama", 3), ("gemma3_text", 5)])
def test_greedy_decode_lossless_with_fused_forced_on(monkeypatch, family, seed):
    """Fused path forced on (emulated Metal kernel): greedy output equals mlx-lm's."""
    model = wide_model(family, seed=seed)
    prompt = random_prompt(7, seed=4)
    want = reference_tokens(model.base, prompt, 16)
    monkeypatch.setenv(attention.ENV, "fused")
    calls = []
    got, accepted = [], 0
    with attention.fused_override(emulated(calls)):
        for step in decode(model, prompt, 16, drafter=make_drafter(model, TreeSettings((2, 1), 4))):
            got.extend(step.tokens)
            accepted += step.accepted
    assert got[:16] == want
    assert calls, "the fused path was never taken"
    assert accepted > 0, "no draft accepted: committing tree rows went untested"


def test_auto_mode_falls_back_when_the_kernel_fails(monkeypatch):
    monkeypatch.setenv(attention.ENV, "auto")
    monkeypatch.setattr(attention, "_disabled", None)
    model = wide_model("llama")
    prompt, tree = random_prompt(5), build_tree((2, 1))
    ref_main, _ = tree_forward(model, prompt, tree)

    def failing(*args):
        raise RuntimeError("Unable to build metal library from source")

    with attention.fused_override(failing):
        with pytest.warns(RuntimeWarning, match="using the reference"):
            main, _ = tree_forward(model, prompt, tree)
    assert mx.array_equal(main, ref_main)
    assert "metal library" in attention._disabled
    monkeypatch.setenv(attention.ENV, "fused")
    with attention.fused_override(failing):
        with pytest.raises(RuntimeError, match="metal library"):
            tree_forward(model, prompt, tree)


def test_pruned_tree_forward_with_emulated_kernel_matches_reference(monkeypatch):
    """Early-exit pruning keeps 4 of 7 nodes: the top layers see the pruned tree."""
    model = wide_model("llama", seed=2)
    prompt, tree = random_prompt(9, seed=5), build_tree((3, 2), max_nodes=7)
    prune = PruneSettings(threshold=0.0, max_keep=4)
    monkeypatch.setenv(attention.ENV, "reference")
    ref_main, ref_streams = tree_forward(model, prompt, tree, prune)
    monkeypatch.setenv(attention.ENV, "fused")
    calls = []
    with attention.fused_override(emulated(calls)):
        main, streams = tree_forward(model, prompt, tree, prune)
    assert [c[2] for c in calls] == [7, 7, 16, 16]
    np.testing.assert_allclose(np.array(main), np.array(ref_main), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(streams), np.array(ref_streams), atol=2e-4, rtol=2e-4)
