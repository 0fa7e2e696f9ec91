"""The EAGLE-style head, the other peer: lossless drafting, training, files that must match."""

import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from .helpers import checkpoint_with_own_data, decode_tokens, random_prompt, reference_tokens, ss_model
from specstream_mlx.loading import load
from specstream_mlx.cli import app
from specstream_mlx.config import CheckpointError, TreeSettings
from specstream_mlx.drafters import EagleDrafter, make_drafter
from specstream_mlx.eagle import EagleHead, eagle_config_for, load_eagle, save_eagle


def _random_head(model, seed=5, scale=0.2):
    from mlx.utils import tree_map

    head = EagleHead(model.base, eagle_config_for(model.base))
    mx.random.seed(seed)
    head.update(tree_map(lambda a: mx.random.normal(a.shape) * scale, head.parameters()))
    mx.eval(head.parameters())
    return head


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("widths", [(1, 1, 1), (3, 2, 1), (2, 2)])
def test_eagle_greedy_equals_mlx_lm(family, widths):
    model = ss_model(family, seed=2)
    model.set_eagle(_random_head(model))
    prompt = random_prompt(9, seed=3)
    drafter = make_drafter(model, TreeSettings(widths, None), source="eagle")
    assert isinstance(drafter, EagleDrafter) and not drafter.uses_streams
    tokens, steps = decode_tokens(model, prompt, 24, drafter=drafter)
    assert tokens == reference_tokens(model.base, prompt, 24)
    assert all(s.tree_size == drafter.shape.size for s in steps[1:])


def test_eagle_children_depend_on_their_parent():
    """Unlike streams and Medusa heads, a depth-2 guess knows the depth-1 guess above it."""
    model = ss_model("llama", seed=2)
    head = _random_head(model)
    hidden = head.fc.weight.shape[0]
    # the token half of the input dominates, as after training
    head.fc.weight = mx.concatenate([head.fc.weight[:, :hidden] * 0.01, head.fc.weight[:, hidden:] * 30], axis=1)
    model.set_eagle(head)
    drafter = make_drafter(model, TreeSettings((3, 1), None), source="eagle")
    decode_tokens(model, random_prompt(9, seed=3), 1, drafter=drafter)  # the prefill feeds the head
    draft = drafter.propose(random_prompt(9, seed=3), 8)
    tokens = draft.tokens.tolist()  # nodes 1..3 at depth 1, 4..6 their children
    assert len(set(tokens[3:])) > 1, tokens


def test_eagle_files_must_match_the_base(tmp_path):
    model = ss_model("llama")
    head = _random_head(model)
    save_eagle(head, tmp_path)
    loaded = load_eagle(tmp_path, model.base)
    assert mx.array_equal(loaded.fc.weight, head.fc.weight)
    config = json.loads((tmp_path / "eagle.json").read_text())
    (tmp_path / "eagle.json").write_text(json.dumps(dict(config, model_type="qwen2")))
    with pytest.raises(CheckpointError, match="model type qwen2, but this model has llama"):
        load_eagle(tmp_path, model.base)
    (tmp_path / "eagle.json").write_text(json.dumps(config))
    weights = mx.load(str(tmp_path / "eagle.safetensors"))
    weights["fc.weight"] = weights["fc.weight"][:, :8]
    mx.save_safetensors(str(tmp_path / "eagle.safetensors"), weights)
    with pytest.raises(CheckpointError, match="does not match"):
        load_eagle(tmp_path, model.base)
    (tmp_path / "eagle.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only one of eagle.json and eagle.safetensors"):
        load_eagle(tmp_path, model.base)
    with pytest.raises(ValueError, match="no EAGLE head"):
        make_drafter(model, source="eagle")


def test_train_eagle_learns_the_base_and_drafts_through_the_cli(tmp_path):
    ckpt, data = checkpoint_with_own_data(tmp_path)
    runner = CliRunner()
    out = tmp_path / "eagle"
    args = ["train-heads", "--kind", "eagle", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--batch-size", "8", "--max-seq-len", "64", "--learning-rate", "3e-3", "--warmup", "5",
            "--save-every", "50"]
    result = runner.invoke(app, args + ["--iters", "100"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, args + ["--iters", "150", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eagle_state.json").read_text())["step"] == 150
    model, _ = load(str(out))
    assert model.eagle is not None and model.medusa is None
    accepted = forwards = 0
    for i in range(4):
        prompt = random_prompt(6, seed=100 + i)
        tokens, steps = decode_tokens(model, prompt, 24, drafter=make_drafter(
            model, TreeSettings((2, 1, 1), None), source="eagle"))
        assert tokens == reference_tokens(model.base, prompt, 24)
        accepted += sum(s.accepted for s in steps[1:])
        forwards += len(steps) - 1
    assert accepted / forwards > 0.5, (accepted, forwards)
    result = runner.invoke(app, ["generate", "--model", str(out), "--drafts", "eagle", "-p", "go", "-m", "12"])
    assert result.exit_code == 0, result.output
