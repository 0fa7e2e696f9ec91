"""Stream-row LoRA (issue 16): low-rank updates of the multi-stream layers' projections
that stream rows get and main rows never do, so lossless output stays the base model's."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from .helpers import (
    base_model, decode_tokens, random_prompt, reference_tokens, ss_model, tiny_train_args,
    write_base, write_count_data,
)
from specstream_mlx.cache import make_cache
from specstream_mlx.cli import app
from specstream_mlx.config import CheckpointError, SpecStreamConfig, TreeSettings
from specstream_mlx.families import family_for
from specstream_mlx.forward import forward
from specstream_mlx.loading import fresh_model, load, save_streams
from specstream_mlx.masks import chain_rows, tree_rows
from specstream_mlx.model import StreamRowsLinear
from specstream_mlx.train.data import Example
from specstream_mlx.train.losses import LossWeights, loss_fn, train_forward
from specstream_mlx.train.loop import TrainConfig, make_trainable, trainable_names
from specstream_mlx.tree import build_tree


def _zero_updates(model) -> None:
    for lora in model.stream_lora:
        for path in lora.paths:
            pair = lora.pair(path)
            pair["b"] = mx.zeros_like(pair["b"])


def test_every_projection_of_the_stream_layers_is_wrapped_once():
    model = ss_model("phi3", stream_lora_rank=4)  # phi3: fused qkv and gate-up projections
    assert len(model.stream_lora) == 2
    first = model.first_stream_layer
    for k, layer in enumerate(model.layers):
        wrapped = sorted(p for p, m in layer.named_modules() if isinstance(m, StreamRowsLinear))
        assert wrapped == (sorted(model.stream_lora[k - first].paths) if k >= first else [])
    assert set(model.stream_lora[0].paths) == {"self_attn.qkv_proj", "self_attn.o_proj",
                                               "mlp.gate_up_proj", "mlp.down_proj"}
    qkv = model.stream_lora[0].pair("self_attn.qkv_proj")
    hidden = model.config.hidden_size
    assert qkv["a"].shape == (hidden, 4) and qkv["b"].shape[0] == 4
    # A second model over the same base re-wraps the inner projections, never a wrapper.
    again = type(model)(model.base, model.config, model.family)
    for path, module in again.layers[-1].named_modules():
        if isinstance(module, StreamRowsLinear):
            assert not isinstance(module.inner, StreamRowsLinear), path


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3"])
def test_main_rows_never_see_the_updates_and_stream_rows_do(family):
    model = ss_model(family, stream_lora_rank=4, seed=2)
    tokens = random_prompt(16, seed=4)
    tree = build_tree((2, 2))
    rows = tree_rows(tree)

    def run():
        cache = make_cache(model.num_layers)
        out = forward(model, mx.array(tokens[:8]), chain_rows(8, [7]), cache)
        for layer in cache:
            layer.commit(np.arange(8))
        draft = mx.array(tokens[8 : 8 + tree.size])
        step = forward(model, draft, rows, cache, tree=tree)
        return out, step

    (prefill, step) = run()
    _zero_updates(model)
    (prefill0, step0) = run()
    for with_lora, without in ((prefill, prefill0), (step, step0)):
        np.testing.assert_array_equal(np.array(with_lora.main_hidden), np.array(without.main_hidden))
        gap = mx.abs(with_lora.stream_hidden - without.stream_hidden).max().item()
        assert gap > 1e-2, gap


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lossless_decoding_with_stream_lora_is_mlx_lm_greedy(family):
    model = ss_model(family, stream_lora_rank=8, adapter_rank=4, seed=3)
    prompt = random_prompt(20, seed=7)
    expected = reference_tokens(model.base, prompt, 30)  # no stream rows: the wrappers pass through
    fresh_base, _ = base_model(family, 3)  # the same random base with no wrapper at all
    assert reference_tokens(fresh_base, prompt, 30) == expected
    for tree in (TreeSettings((3, 2, 1), None), TreeSettings((1, 1, 1), None)):
        tokens, steps = decode_tokens(model, prompt, 30, tree=tree)
        assert tokens == expected


def test_training_and_cached_forwards_apply_the_updates_as_inference_does():
    from specstream_mlx.train.cached import precompute, stream_hidden

    model = ss_model("llama", stream_lora_rank=4, seed=5)
    tokens = random_prompt(16, seed=9)
    main, streams, _ = train_forward(model, mx.array([tokens]))
    for t in (0, 7, 15):
        out = forward(model, mx.array(tokens[: t + 1]), chain_rows(t + 1, [t]), make_cache(4))
        np.testing.assert_allclose(np.array(streams[0, t]), np.array(out.stream_hidden[0]), atol=1e-4)
        np.testing.assert_allclose(np.array(main[0, t]), np.array(out.main_hidden[-1]), atol=1e-4)
    cached = precompute(model, [Example(tuple(tokens), 8)])[0]
    positions, hidden = stream_hidden(model, cached)
    np.testing.assert_allclose(np.array(hidden), np.array(streams[0, mx.array(positions)]), atol=1e-4)


def _fresh(rank=4, mode="lossless"):
    base, config = base_model("llama")
    spec = SpecStreamConfig(gamma=3, stream_layers=2, mode=mode, stream_lora_rank=rank,
                            hidden_size=64, vocab_size=272, num_layers=4)
    return fresh_model(base, family_for(config["model_type"]), spec)


def test_fresh_updates_are_zero_and_train_from_the_stream_loss_only():
    model = _fresh()
    pairs = [lora.pair(p) for lora in model.stream_lora for p in lora.paths]
    assert pairs and all(mx.all(p["b"] == 0).item() and mx.abs(p["a"]).max().item() > 0 for p in pairs)
    make_trainable(model, TrainConfig())
    names = set(trainable_names(model))
    lora = {n for n in names if n.startswith("stream_lora.")}
    assert len(lora) == 2 * 2 * 7  # 2 layers x 7 projections x (a, b)
    assert not any(n.startswith("base.") for n in names)
    tokens = mx.array([random_prompt(24, seed=1)])
    mask = np.zeros((1, 24), dtype=bool)
    mask[0, 8:] = True

    def grads(weights):
        fn = lambda m: loss_fn(m, tokens, mask, weights)[0]  # noqa: E731
        import mlx.nn as nn

        _, g = nn.value_and_grad(model, fn)(model)
        return dict(tree_flatten(g))

    g = grads(LossWeights())
    assert all(mx.abs(g[n]).max().item() > 0 for n in lora if n.endswith(".b"))
    g = grads(LossWeights(main=1.0, stream=0.0, early_exit=0.0))  # the main loss never reaches them
    assert all(mx.abs(g[n]).max().item() == 0 for n in lora)


def test_checkpoint_round_trip_and_bad_settings(tmp_path):
    base_dir = write_base(tmp_path / "ckpt", "llama", seed=3)
    model = ss_model("llama", stream_lora_rank=4, seed=3)
    save_streams(model, base_dir)
    assert json.loads((base_dir / "specstream.json").read_text())["stream_lora_rank"] == 4
    loaded, _ = load(str(base_dir))
    for name, value in model.stream_parameters().items():
        np.testing.assert_array_equal(np.array(loaded.stream_parameters()[name]), np.array(value))
    prompt = random_prompt(12, seed=1)
    assert decode_tokens(loaded, prompt, 12, tree=TreeSettings((2, 1), None))[0] == \
        decode_tokens(model, prompt, 12, tree=TreeSettings((2, 1), None))[0]
    # Files without stream LoRA do not name it (older readers still read them).
    plain = ss_model("llama", seed=3)
    assert "stream_lora_rank" not in plain.config.to_dict()
    with pytest.raises(CheckpointError, match="lossless streams"):
        SpecStreamConfig(mode="shared", stream_lora_rank=4, num_layers=4).validate()
    with pytest.raises(CheckpointError, match="stream_lora_rank must be >= 0"):
        SpecStreamConfig(stream_lora_rank=-1, num_layers=4).validate()


def test_pytorch_reference_refuses_stream_lora():
    from specstream_mlx.convert import ConversionError
    from specstream_mlx.convert.to_torch import reference_config

    with pytest.raises(ConversionError, match="stream LoRA"):
        reference_config(ss_model("llama", stream_lora_rank=4))


def test_cli_trains_stream_lora_and_generates_the_base_models_text(tmp_path):
    base_dir = write_base(tmp_path / "base", "llama")
    data = write_count_data(tmp_path / "data.jsonl")
    out = tmp_path / "trained"
    runner = CliRunner()
    args = tiny_train_args(base_dir, data, out) + ["--stream-layers", "2", "--stream-lora-rank", "4",
                                                   "--iters", "2"]
    refused = runner.invoke(app, args + ["--mode", "shared"])
    assert refused.exit_code != 0 and "lossless streams" in refused.output, refused.output
    assert not out.exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "specstream.json").read_text())["stream_lora_rank"] == 4
    trained, _ = load(str(out))
    assert any(mx.abs(trained.stream_lora[0].pair(p)["b"]).max().item() > 0
               for p in trained.stream_lora[0].paths)
    result = runner.invoke(app, ["generate", "--model", str(out), "-p", "count 9", "-m", "12"])
    assert result.exit_code == 0, result.output
    prompt = random_prompt(10, seed=2)
    expected = reference_tokens(trained.base, prompt, 16)
    assert decode_tokens(trained, prompt, 16, tree=TreeSettings((2, 1), None))[0] == expected


def test_overlapped_chain_drafts_as_decode_does(monkeypatch):
    from specstream_mlx import overlap

    model = ss_model("llama", stream_lora_rank=4, seed=6)
    prompt = random_prompt(30, seed=1)
    runs = []
    for setting in ("0", "1"):
        monkeypatch.setenv(overlap.ENV, setting)
        runs.append(decode_tokens(model, prompt, 40, tree=TreeSettings((1, 1), None)))
    (plain, plain_steps), (fast, fast_steps) = runs
    assert fast == plain
    assert sum(s.accepted for s in plain_steps) > 0  # drafts that the updates shaped were taken
    assert [(s.accepted, s.tree_size) for s in fast_steps] == [(s.accepted, s.tree_size) for s in plain_steps]


def test_the_cached_main_stream_is_shared_with_runs_without_stream_lora(tmp_path):
    # The main rows never see the updates, so a run with stream LoRA reads the
    # main-stream shards a run without it wrote (the learning curve's shared cache).
    from specstream_mlx.train import cached

    with_lora, without = _fresh(rank=4), _fresh(rank=0)
    examples = [Example(tuple(random_prompt(10, seed=1)), 3)]
    want = cached.precompute(without, examples, folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    got = cached.precompute(with_lora, examples, folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # read back, not a second folder
    np.testing.assert_allclose(np.array(got[0].hidden), np.array(want[0].hidden), atol=1e-6)
    other = SpecStreamConfig(gamma=3, stream_layers=1, mode="lossless", hidden_size=64,
                             vocab_size=272, num_layers=4)
    base, config = base_model("llama")
    cached.precompute(fresh_model(base, family_for(config["model_type"]), other), examples,
                      folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # other stream layers: other states
