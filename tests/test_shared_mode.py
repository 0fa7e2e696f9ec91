"""Shared mode: the paper's MSA mask (main rows never see a stream), exact decoding of its own output."""

import json

import mlx.core as mx
import numpy as np
import pytest

from .helpers import decode_tokens, random_prompt, ss_model
from specstream_mlx import decode as decode_module
from specstream_mlx.cache import make_cache
from specstream_mlx.config import CheckpointError, SpecStreamConfig, TreeSettings, read_config
from specstream_mlx.forward import forward, logits
from specstream_mlx.masks import chain_rows


def _fine_tuned(model):
    """Move the top layers' weights (as a LoRA fine-tune would), so output differs from the base."""
    layer = model.base.model.layers[-1]
    weight = layer.mlp.down_proj.weight
    layer.mlp.down_proj.weight = weight + 0.5 * mx.random.normal(weight.shape, key=mx.random.key(9))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("widths", [(1, 1, 1), (3, 2, 1)])
def test_shared_mode_equals_its_own_one_token_decoding(family, widths):
    model = _fine_tuned(ss_model(family, mode="shared"))
    prompt = random_prompt(30, seed=3)
    plain, _ = decode_tokens(model, prompt, 30, speculative=False, prefill_step_size=16)
    spec, steps = decode_tokens(model, prompt, 30, tree=TreeSettings(widths, None),
                                prefill_step_size=16)
    assert spec == plain


def test_fine_tuned_weights_change_the_output():
    """The test above decodes a model that really differs from its base (else it is vacuous)."""
    prompt = random_prompt(30, seed=3)
    base, _ = decode_tokens(ss_model("llama", mode="shared"), prompt, 30, speculative=False)
    tuned, _ = decode_tokens(_fine_tuned(ss_model("llama", mode="shared")), prompt, 30,
                             speculative=False)
    assert base != tuned


def test_streams_do_not_change_main_logits_in_shared_mode():
    """Main rows attend main rows only: new stream embeddings and adapters leave them as they are."""
    model = ss_model("llama", mode="shared", adapter_rank=4)
    prompt = mx.array(random_prompt(30, seed=3))
    every_row = chain_rows(30, np.arange(30))
    before = logits(model, forward(model, prompt, every_row, make_cache(4)).main_hidden)
    model.stream_embeddings = model.stream_embeddings * -3.0 + 1.0
    for adapter in model.stream_adapters:
        adapter.up.weight = adapter.up.weight * 5.0
    mx.eval(model.parameters())
    after = logits(model, forward(model, prompt, every_row, make_cache(4)).main_hidden)
    assert mx.array_equal(before, after).item()
    without = logits(model, forward(model, prompt, chain_rows(30), make_cache(4)).main_hidden)
    np.testing.assert_allclose(np.array(after), np.array(without), atol=1e-4, rtol=1e-4)
    # ... while the stream rows themselves did move.
    streams_a = forward(model, prompt, every_row, make_cache(4)).stream_hidden
    model.stream_embeddings = model.stream_embeddings + 1.0
    streams_b = forward(model, prompt, every_row, make_cache(4)).stream_hidden
    assert mx.abs(streams_a - streams_b).max().item() > 1e-3


def _forward_spy(monkeypatch):
    calls = []
    real = decode_module.forward

    def spy(model, tokens, rows, cache, **kw):
        calls.append((rows.size, rows.stream_nodes.tolist(), kw.get("streams")))
        return real(model, tokens, rows, cache, **kw)

    monkeypatch.setattr(decode_module, "forward", spy)
    return calls


def test_shared_prefill_runs_stream_rows_at_the_last_position_only(monkeypatch):
    model = ss_model("qwen2", mode="shared")
    calls = _forward_spy(monkeypatch)
    decode_tokens(model, random_prompt(40, seed=1), 4, tree=TreeSettings((2, 1), None),
                  prefill_step_size=16)
    prefill = calls[:3]  # chunks of 16, 16 and 8 prompt tokens
    assert [(size, nodes) for size, nodes, _ in prefill] == [(16, []), (16, []), (8, [7])]
    # every forward runs only the streams the depth-2 tree reads
    assert {streams for _, _, streams in calls} == {2}
    # a plain decode runs no stream rows at all, in shared mode too
    calls.clear()
    decode_tokens(model, random_prompt(40, seed=1), 4, speculative=False, prefill_step_size=16)
    assert all(nodes == [] for _, nodes, _ in calls)


def test_old_shared_mask_checkpoint_is_refused(tmp_path):
    config = SpecStreamConfig(mode="shared", hidden_size=64, vocab_size=100, num_layers=4)
    data = config.to_dict()
    (tmp_path / "specstream.json").write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(CheckpointError, match="old mask.*Retrain"):
        read_config(tmp_path)
    # a lossless file of the previous version means the same thing today: read as current
    (tmp_path / "specstream.json").write_text(
        json.dumps({**data, "mode": "lossless", "format_version": 2}))
    assert read_config(tmp_path).format_version == SpecStreamConfig().format_version
