"""Attention dispatch: what the backend has, the env switch, and the fused path end to end.

Without a GPU, the end-to-end fused tests plug the CPU emulator of the Metal
kernel in, either as the fused implementation (``attention.fused_override``)
or behind ``mx.fast.metal_kernel`` (``kernel_cases.FakeDevice``: the whole
launch path, variant checks included): the runtime then hands every tree /
multi-stream attention call, through the ``TreeMask`` and the ``StepView``
buffers, to the kernel source. On a Mac or a CUDA GPU the ``device`` tests run
the real kernel (the models here have head dim 64, a size it serves).
"""

from __future__ import annotations

import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest

from .helpers import base_model, random_prompt, reference_tokens
from .kernel_cases import FakeDevice, get_emulator
from specstream_mlx import attention
from specstream_mlx.cache import make_cache
from specstream_mlx.config import PruneSettings, SpecStreamConfig, TreeSettings
from specstream_mlx.decode import decode
from specstream_mlx.drafters import make_drafter
from specstream_mlx.families import family_for
from specstream_mlx.forward import forward, logits
from specstream_mlx.kernels_metal import emulator, launch, sources
from specstream_mlx.masks import chain_rows, tree_rows
from specstream_mlx.model import SpecStreamModel
from specstream_mlx.tree import build_tree

HAS_DEVICE = launch.backend() is not None
needs_compiler = pytest.mark.skipif(emulator.compiler() is None, reason="needs a C++ compiler (g++)")


def wide_model(family: str, seed: int = 0, mode: str = "lossless") -> SpecStreamModel:
    """A random ``SpecStreamModel`` over ``family``'s head-dim-64 test config (GQA 2)."""
    base, config = base_model(f"{family}-d64", seed)
    assert config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) == 64
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


def test_dispatch_takes_what_the_backend_has(monkeypatch):
    """This CPU: no kernel, the dense mask as before; a Mac / CUDA GPU: the kernel's TreeMask."""
    monkeypatch.delenv(attention.ENV, raising=False)
    model = wide_model("llama")
    assert attention.is_installed(model.base)
    mask = attention.layer_mask(model.base, np.tril(np.ones((3, 3), bool)), 5,
                                np.array([0, 1, 1]), None, False, lambda: None)
    # 5 cached keys seen by every row, then the causal 3 x 3 block.
    expected = [[1, 1, 1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1, 1, 1, 1]]
    if HAS_DEVICE:
        assert attention.fused_impl() is launch.tree_attention
        assert type(mask) is attention.TreeMask and mask.offset == 5 and mask.window is None
        np.testing.assert_array_equal(np.array(mask.dense()), expected)
    else:
        assert attention.fused_impl() is None
        assert mask.dtype == mx.bool_
        np.testing.assert_array_equal(np.array(mask), expected)


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


def test_forced_fused_takes_the_device_kernel_or_says_why(monkeypatch):
    monkeypatch.setenv(attention.ENV, "fused")
    model = wide_model("llama")
    prompt, tree = random_prompt(5), build_tree((2, 1))
    if not HAS_DEVICE:
        with pytest.raises(RuntimeError, match="fused.*no fused kernel on this device"):
            tree_forward(model, prompt, tree)
        return
    main, streams = tree_forward(model, prompt, tree)  # the real kernel, every tree call
    monkeypatch.setenv(attention.ENV, "reference")
    ref_main, ref_streams = tree_forward(model, prompt, tree)
    np.testing.assert_allclose(np.array(main), np.array(ref_main), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(streams), np.array(ref_streams), atol=2e-4, rtol=2e-4)


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
    monkeypatch.setattr(attention, "_failed", {})
    model = wide_model("llama")
    prompt, tree = random_prompt(5), build_tree((2, 1))
    ref_main, _ = tree_forward(model, prompt, tree)
    tries = []

    def failing(*args):
        tries.append(args[0].shape)
        raise RuntimeError("Unable to build metal library from source")

    with attention.fused_override(failing):
        with pytest.warns(RuntimeWarning, match="float32, head dim 64; its calls use the reference"):
            main, _ = tree_forward(model, prompt, tree)
        assert mx.array_equal(main, ref_main)
        assert len(tries) == 1  # remembered: the other layers went straight to the reference
        assert list(attention.failures()) == [("float32", 64)]
        assert "metal library" in attention.failures()[("float32", 64)]
        monkeypatch.setenv(attention.ENV, "fused")
        with pytest.raises(RuntimeError, match="metal library"):
            tree_forward(model, prompt, tree)


INJECTED_FAULT = 'static_assert(NSIMD != 1, "injected fault: this variant does not compile");\n'


@needs_compiler
def test_auto_mode_falls_back_per_variant_when_one_fails_to_compile(monkeypatch):
    """One variant of the kernel source (1 SIMD group) does not compile; MLX would only say so
    at the decode's ``mx.eval``. Its calls must take the reference, the others keep the kernel,
    the tokens are mlx-lm's, and one warning line says what happened."""
    device = FakeDevice().install(monkeypatch, max_threads=64)  # 1 or 2 SIMD groups
    monkeypatch.setattr(launch, "kernel_source", lambda flavour: INJECTED_FAULT
                        + sources.kernel_source(flavour))
    monkeypatch.setattr(attention, "_failed", {})
    monkeypatch.setenv(attention.ENV, "auto")
    model = wide_model("llama", seed=3)
    # 110 prompt tokens: the first tree calls have < 128 keys (1 SIMD group), later
    # ones >= 128 (2 SIMD groups), so both variants are wanted.
    prompt = random_prompt(110, seed=4)
    want = reference_tokens(model.base, prompt, 16)
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in decode(model, prompt, 16, drafter=make_drafter(model, TreeSettings((2, 1), 4))):
            got.extend(step.tokens)
    assert got[:16] == want
    bad, good = emulator.Variant("float32", 64, 1, 4), emulator.Variant("float32", 64, 2, 4)
    assert list(device.broken) == [bad] and "injected fault" in device.broken[bad]
    assert list(attention.failures()) == [("metal", "float32", 64, 1, 4)]
    fused = [w for w in caught if "fused tree attention" in str(w.message)]
    assert len(fused) == 1, [str(w.message) for w in fused]
    message = str(fused[0].message)
    assert "\n" not in message and "head dim 64, 1 SIMD group(s)" in message
    # the 2-SIMD-group variant kept the kernel: the limit probe, the check, and real calls
    assert set(device.launches) == {good} and len(device.launches) > 2


@pytest.fixture(params=["device", "emulated"])
def kernel_device(request, monkeypatch):
    """The launch path on this machine's GPU (Mac / CUDA), or on the CPU emulator behind
    ``mx.fast.metal_kernel``."""
    if request.param == "device":
        if not HAS_DEVICE:
            pytest.skip("no Metal or CUDA GPU here (the real kernel runs on a Mac or a CUDA box)")
        return None
    if emulator.compiler() is None:
        pytest.skip("needs a C++ compiler (g++)")
    return FakeDevice().install(monkeypatch, max_threads=64)


@pytest.mark.parametrize("family,seed", [("llama", 3), ("gemma3_text", 5)])
def test_greedy_decode_through_the_launch_path(monkeypatch, kernel_device, family, seed):
    """Forced fused, no override: ``launch.tree_attention`` serves every tree call, and the
    greedy tokens are mlx-lm's (with drafts accepted)."""
    model = wide_model(family, seed=seed)
    prompt = random_prompt(7, seed=4)
    want = reference_tokens(model.base, prompt, 16)
    monkeypatch.setenv(attention.ENV, "fused")
    calls = []
    real = launch.tree_attention

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(launch, "tree_attention", counted)
    got, accepted = [], 0
    for step in decode(model, prompt, 16, drafter=make_drafter(model, TreeSettings((2, 1), 4))):
        got.extend(step.tokens)
        accepted += step.accepted
    assert got[:16] == want
    assert calls and accepted > 0
    if kernel_device is not None:
        assert kernel_device.launches and not kernel_device.broken


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
