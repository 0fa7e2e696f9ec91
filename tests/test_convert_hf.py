"""Hugging Face -> specstream-mlx conversion: logits and greedy text match transformers,
and the PyTorch SS reference matches the MLX multi-stream forward.

Tiny random transformers models of every supported family are built here (no
downloads). Needs torch (``pip install "specstream-mlx[torch]"``); skipped without it.
"""

import functools

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from .helpers import decode_tokens, random_prompt  # noqa: E402
from .hf_models import HF_FAMILIES, hf_greedy, hf_logits, hf_model, save_hf  # noqa: E402
from specstream_mlx.cache import commit, make_cache  # noqa: E402
from specstream_mlx.convert import convert  # noqa: E402
from specstream_mlx.convert.hf_config import mlx_config  # noqa: E402
from specstream_mlx.convert.reference import SpecStreamReference  # noqa: E402
from specstream_mlx.convert.streams import save_torch_checkpoint  # noqa: E402
from specstream_mlx.config import TreeSettings
from specstream_mlx.drafters import tree_rows  # noqa: E402
from specstream_mlx.masks import tree_rows
from specstream_mlx.forward import forward, logits  # noqa: E402
from specstream_mlx.loading import load  # noqa: E402
from specstream_mlx.masks import chain_rows  # noqa: E402
from specstream_mlx.tree import build_tree  # noqa: E402

ATOL = 1e-4  # float32; logits are O(1)


@functools.lru_cache(maxsize=None)
def _hf(family):
    return hf_model(family, seed=1)


def _converted(tmp_path, family, fmt="safetensors", **kwargs):
    src = save_hf(_hf(family), tmp_path / f"{family}-{fmt}", fmt)
    return convert(str(src), str(tmp_path / f"{family}-{fmt}-mlx"), quiet=True, **kwargs)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_logits_and_greedy_text_match_transformers(tmp_path, family):
    model, tokenizer = load(str(_converted(tmp_path, family)))
    prompt = random_prompt(20, seed=3)
    mlx_logits = np.array(logits(model, _main_hidden(model, prompt)))
    expected = hf_logits(_hf(family), prompt)
    np.testing.assert_allclose(mlx_logits, expected, atol=ATOL, rtol=0)
    tokens, _ = decode_tokens(model, prompt, 12, tree=TreeSettings((2, 2, 1), None))
    assert tokens == hf_greedy(_hf(family), prompt, 12)
    # The tokenizer came along: its text round trip works.
    assert tokenizer.decode(tokenizer.encode("hello", add_special_tokens=False)) == "hello"


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_bin_and_sharded_checkpoints(tmp_path, fmt):
    out = _converted(tmp_path, "qwen2", fmt)
    if fmt == "sharded":
        assert len(list((tmp_path / "qwen2-sharded").glob("model-*.safetensors"))) > 1
    model, _ = load(str(out))
    prompt = random_prompt(16, seed=4)
    np.testing.assert_allclose(
        np.array(logits(model, _main_hidden(model, prompt))),
        hf_logits(_hf("qwen2"), prompt), atol=ATOL, rtol=0,
    )


def test_dtype_option_casts_the_saved_weights(tmp_path):
    out = _converted(tmp_path, "llama", dtype="bfloat16")
    saved = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.bfloat16}
    model, _ = load(str(out), dtype=mx.float32)
    prompt = random_prompt(12)
    got = np.array(logits(model, _main_hidden(model, prompt)))
    np.testing.assert_allclose(got, hf_logits(_hf("llama"), prompt), atol=0.1, rtol=0)


def _main_hidden(model, prompt):
    cache = make_cache(model.num_layers)
    return forward(model, mx.array(prompt), chain_rows(len(prompt)), cache).main_hidden


def _reference(family, mode, gamma=3, stream_layers=2):
    hf = _hf(family)
    ref = SpecStreamReference(mlx_config(hf.config.to_dict()), gamma, stream_layers, mode)
    ref.load_base(hf.state_dict())
    torch.manual_seed(7)
    with torch.no_grad():  # trained-looking streams: every parameter non-zero
        ref.stream_embeddings.normal_(0, 0.5)
        ref.prune_adapter.down.weight.normal_(0, 0.1)
        ref.prune_adapter.up.weight.normal_(0, 0.1)
    return ref.eval()


def _tree_inputs(prefix_len, tree):
    """Positions and mask of the reference's full sequence: prefix, then tree rows."""
    n = prefix_len + tree.size
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:prefix_len, :prefix_len] = torch.tril(torch.ones(prefix_len, prefix_len, dtype=torch.bool))
    mask[prefix_len:, :prefix_len] = True
    mask[prefix_len:, prefix_len:] = torch.from_numpy(tree.mask)
    positions = torch.cat([torch.arange(prefix_len), prefix_len + torch.from_numpy(tree.depth)])
    return positions, mask


@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_reference_matches_mlx_forward(tmp_path, family, mode):
    ref = _reference(family, mode)
    streams = tmp_path / "ss.pt"
    save_torch_checkpoint(ref, streams)
    src = save_hf(_hf(family), tmp_path / "hf")
    model, _ = load(str(convert(str(src), str(tmp_path / "out"), streams=str(streams), quiet=True)))
    assert model.config.mode == mode and model.config.stream_layers == 2

    # Prefill of 12 tokens, every row drafting through its streams.
    prompt = random_prompt(12, seed=5)
    cache = make_cache(model.num_layers)
    out = forward(model, mx.array(prompt), chain_rows(12, np.arange(12)), cache)
    with torch.no_grad():
        main, stream, exit_hidden = ref(torch.tensor(prompt), stream_nodes=torch.arange(12))
    np.testing.assert_allclose(np.array(logits(model, out.main_hidden)), main.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(logits(model, out.stream_hidden)), stream.numpy(), atol=ATOL, rtol=0)

    # A tree step on top of the committed prompt: tree mask and stream positions.
    commit(cache, np.arange(12), None, model.num_layers)
    tree = build_tree((2, 2, 1))
    tokens = random_prompt(tree.size, seed=6)
    out = forward(model, mx.array(tokens), tree_rows(tree), cache)
    positions, mask = _tree_inputs(12, tree)
    rows = torch.arange(12, 12 + tree.size)  # the tree's nodes carry streams (either mode)
    with torch.no_grad():
        main, stream, _ = ref(torch.tensor(prompt + tokens), positions, mask, stream_nodes=rows)
    np.testing.assert_allclose(np.array(logits(model, out.main_hidden)), main[12:].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(logits(model, out.stream_hidden)), stream.numpy(),
                               atol=ATOL, rtol=0)

    if mode == "lossless":  # the reference's main rows are the base model's (transformers)
        with torch.no_grad():
            plain, _, _ = ref(torch.tensor(prompt))
        np.testing.assert_allclose(plain.numpy(), hf_logits(_hf(family), prompt), atol=ATOL, rtol=0)
