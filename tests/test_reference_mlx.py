"""The PyTorch reference built from an MLX model (``convert.to_torch``) computes what the
MLX runtime computes, stream adapters and pruning adapter included, and PyTorch SS
checkpoints carry stream adapters through ``convert --streams``.

No transformers needed: tiny random mlx-lm models. Skipped without torch.
"""

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from .helpers import random_prompt, ss_model, write_base  # noqa: E402
from specstream_mlx.cache import commit, make_cache  # noqa: E402
from specstream_mlx.convert import ConversionError, convert  # noqa: E402
from specstream_mlx.convert.streams import read_streams, save_torch_checkpoint  # noqa: E402
from specstream_mlx.convert.to_torch import to_reference  # noqa: E402
from specstream_mlx.drafters import tree_rows  # noqa: E402
from specstream_mlx.masks import tree_rows
from specstream_mlx.forward import forward, logits  # noqa: E402
from specstream_mlx.loading import load  # noqa: E402
from specstream_mlx.masks import chain_rows  # noqa: E402
from specstream_mlx.tree import build_tree  # noqa: E402

ATOL = 1e-4  # float32, logits O(1)


def _tree_inputs(prefix_len, tree):
    n = prefix_len + tree.size
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:prefix_len, :prefix_len] = torch.tril(torch.ones(prefix_len, prefix_len, dtype=torch.bool))
    mask[prefix_len:, :prefix_len] = True
    mask[prefix_len:, prefix_len:] = torch.from_numpy(tree.mask)
    positions = torch.cat([torch.arange(prefix_len), prefix_len + torch.from_numpy(tree.depth)])
    return positions, mask


@pytest.mark.parametrize("family,mode", [("llama", "lossless"), ("qwen2", "shared"),
                                         ("phi3", "lossless"), ("qwen3", "shared")])
def test_reference_with_stream_adapters_matches_mlx(family, mode):
    model = ss_model(family, mode=mode, seed=3, adapter_rank=4)
    ref = to_reference(model)
    assert len(ref.stream_adapters) == model.config.stream_layers

    prompt = random_prompt(10, seed=1)
    cache = make_cache(model.num_layers)
    out = forward(model, mx.array(prompt), chain_rows(10, np.arange(10)), cache)
    with torch.no_grad():
        main, streams, exit_hidden = ref(torch.tensor(prompt), stream_nodes=torch.arange(10))
        exit_logits = ref.exit_logits(exit_hidden)
    np.testing.assert_allclose(np.array(logits(model, out.main_hidden)), main.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(logits(model, out.stream_hidden)), streams.numpy(), atol=ATOL, rtol=0)
    # Early exit: the same adapter form (with silu) and the same norm + head.
    hidden = model.base.model.norm(model.prune_adapter(mx.array(exit_hidden.numpy())))
    np.testing.assert_allclose(np.array(logits(model, hidden)), exit_logits.numpy(), atol=ATOL, rtol=0)

    # A tree step on the committed prompt (tree mask, stream positions, adapters on stream rows).
    commit(cache, np.arange(10), None, model.num_layers)
    tree = build_tree((2, 2, 1))
    tokens = random_prompt(tree.size, seed=2)
    out = forward(model, mx.array(tokens), tree_rows(tree), cache)
    positions, mask = _tree_inputs(10, tree)
    with torch.no_grad():  # the tree's nodes carry streams (either mode)
        main, streams, _ = ref(torch.tensor(prompt + tokens), positions, mask,
                               stream_nodes=torch.arange(10, 10 + tree.size))
    np.testing.assert_allclose(np.array(logits(model, out.main_hidden)), main[10:].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(logits(model, out.stream_hidden)), streams.numpy(),
                               atol=ATOL, rtol=0)


def test_stream_adapters_change_the_drafts_only():
    """Adapters act on stream rows: main logits as without them, stream logits not."""
    model = ss_model("llama", seed=5, adapter_rank=4)
    ref = to_reference(model)
    prompt = torch.tensor(random_prompt(8, seed=3))
    with torch.no_grad():
        main, streams, _ = ref(prompt, stream_nodes=torch.arange(8))
        for adapter in ref.stream_adapters:
            adapter.up.weight.zero_()
        plain_main, plain_streams, _ = ref(prompt, stream_nodes=torch.arange(8))
    np.testing.assert_array_equal(main.numpy(), plain_main.numpy())
    assert np.abs(streams.numpy() - plain_streams.numpy()).max() > 1e-2


def test_quantized_model_is_refused(tmp_path):
    base = write_base(tmp_path / "base", "llama", seed=1)
    out = convert(str(base), str(tmp_path / "q"), quantize_bits=4, q_group_size=32, quiet=True)
    model, _ = load(str(out))
    with pytest.raises(ConversionError, match="quantized"):
        to_reference(model)


def test_stream_adapters_are_carried_over_by_convert(tmp_path):
    model = ss_model("llama", seed=7, adapter_rank=4)
    ref = to_reference(model)
    streams = tmp_path / "ss.pt"
    save_torch_checkpoint(ref, streams)
    base = write_base(tmp_path / "base", "llama", seed=7)  # the same random base as ss_model's
    out = convert(str(base), str(tmp_path / "out"), streams=str(streams), quiet=True)
    loaded, _ = load(str(out))
    assert loaded.config.stream_adapter_rank == 4 and loaded.config.stream_layers == 2
    for i, adapter in enumerate(loaded.stream_adapters):
        for name in ("down", "up"):
            np.testing.assert_array_equal(np.array(getattr(adapter, name).weight),
                                          np.array(getattr(model.stream_adapters[i], name).weight))
    # The converted checkpoint computes what the source model computes.
    prompt = random_prompt(9, seed=4)
    rows = chain_rows(9, np.arange(9))
    a = forward(model, mx.array(prompt), rows, make_cache(model.num_layers))
    b = forward(loaded, mx.array(prompt), rows, make_cache(loaded.num_layers))
    np.testing.assert_allclose(np.array(logits(loaded, b.stream_hidden)),
                               np.array(logits(model, a.stream_hidden)), atol=ATOL, rtol=0)


def _save(tmp_path, name, state, config):
    path = tmp_path / name
    torch.save({"specstream_config": config, "state_dict": state}, path)
    return path


def test_incomplete_stream_adapters_are_refused(tmp_path):
    hidden = 64
    state = {"stream_embeddings": torch.randn(3, hidden)}
    for i in range(2):
        state[f"stream_adapters.{i}.down.weight"] = torch.randn(4, hidden)
        state[f"stream_adapters.{i}.up.weight"] = torch.randn(hidden, 4)
    assert read_streams(_save(tmp_path, "ok.pt", state, {"stream_layers": 2})).adapter_rank == 4
    with pytest.raises(ConversionError, match="every multi-stream layer"):
        read_streams(_save(tmp_path, "count.pt", state, {"stream_layers": 3}))
    missing_up = {k: v for k, v in state.items() if k != "stream_adapters.1.up.weight"}
    with pytest.raises(ConversionError, match="every multi-stream layer"):
        read_streams(_save(tmp_path, "pair.pt", missing_up, {}))
    bad_rank = dict(state, **{"stream_adapters.1.down.weight": torch.randn(5, hidden)})
    with pytest.raises(ConversionError, match="stream_adapters.1"):
        read_streams(_save(tmp_path, "rank.pt", bad_rank, {}))
    with pytest.raises(ConversionError, match="stream_adapter_rank=8"):
        read_streams(_save(tmp_path, "cfg.pt", state, {"stream_adapter_rank": 8}))
    lora = dict(state, **{"lora_a": torch.randn(2, 2)})
    with pytest.raises(ConversionError, match="LoRA"):
        read_streams(_save(tmp_path, "lora.pt", lora, {}))
