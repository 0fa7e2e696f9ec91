"""Medusa heads, the peer method: lossless drafting, training, files that must match the base."""

import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from .helpers import checkpoint_with_own_data, decode_tokens, random_prompt, reference_tokens, ss_model
from specstream_mlx.loading import load
from specstream_mlx.cli import app
from specstream_mlx.config import CheckpointError, TreeSettings
from specstream_mlx.drafters import MedusaDrafter, make_drafter
from specstream_mlx.heads import HeadsConfig, MedusaHeads, heads_config_for, load_heads, save_heads


def _random_heads(model, num_heads=3, seed=5):
    heads = MedusaHeads(heads_config_for(model.base, num_heads))
    mx.random.seed(seed)
    for block in heads.blocks:
        block.linear.weight = mx.random.normal(block.linear.weight.shape) * 0.3
    mx.eval(heads.parameters())
    return heads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("widths", [(1, 1, 1), (3, 2, 1), (2, 2)])
def test_medusa_greedy_equals_mlx_lm(family, widths):
    model = ss_model(family, seed=2)
    model.set_medusa(_random_heads(model))
    prompt = random_prompt(9, seed=3)
    drafter = make_drafter(model, TreeSettings(widths, None), source="medusa")
    assert isinstance(drafter, MedusaDrafter) and not drafter.uses_streams
    tokens, steps = decode_tokens(model, prompt, 24, drafter=drafter)
    assert tokens == reference_tokens(model.base, prompt, 24)
    assert all(s.tree_size == drafter.shape.size for s in steps[1:])


def test_medusa_needs_heads_and_takes_no_lookup():
    model = ss_model("llama")
    with pytest.raises(ValueError, match="no Medusa heads .* train-heads"):
        make_drafter(model, source="medusa")
    model.set_medusa(_random_heads(model))
    with pytest.raises(ValueError, match="draft with medusa alone"):
        make_drafter(model, source="medusa", lookup=2)
    with pytest.raises(ValueError, match="source must be streams, medusa or eagle"):
        make_drafter(model, source="hydra")


def test_head_files_must_match_the_base(tmp_path):
    model = ss_model("llama")
    heads = _random_heads(model, num_heads=2)
    save_heads(heads, tmp_path)
    loaded = load_heads(tmp_path, model.base)
    assert loaded.config == heads.config
    assert mx.array_equal(loaded.blocks[1].linear.weight, heads.blocks[1].linear.weight)
    other = ss_model("qwen3")  # another vocabulary layout? same sizes: change the hidden size instead
    config = json.loads((tmp_path / "medusa.json").read_text())
    (tmp_path / "medusa.json").write_text(json.dumps(dict(config, hidden_size=32)))
    with pytest.raises(CheckpointError, match="hidden size 32, but this model has 64"):
        load_heads(tmp_path, model.base)
    (tmp_path / "medusa.json").write_text(json.dumps(dict(config, num_heads=3)))
    with pytest.raises(CheckpointError, match="does not match"):
        load_heads(tmp_path, model.base)
    (tmp_path / "medusa.json").unlink()
    with pytest.raises(CheckpointError, match="only one of medusa.json and medusa.safetensors"):
        load_heads(tmp_path, model.base)
    assert load_heads(tmp_path / "nothing", other.base) is None


def test_train_heads_learns_the_base_and_drafts_through_the_cli(tmp_path):
    """Heads trained on the base model's own greedy continuations (Medusa-1's
    self-distillation) draft them: drafts are accepted, and the output stays exact."""
    ckpt, data = checkpoint_with_own_data(tmp_path)
    runner = CliRunner()
    out = tmp_path / "medusa"
    args = ["train-heads", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--num-heads", "2",
            "--batch-size", "8", "--max-seq-len", "64", "--learning-rate", "2e-2", "--warmup", "5",
            "--save-every", "40"]
    result = runner.invoke(app, args + ["--iters", "80"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["head_1_acc"] > 0.3  # a fresh head is the identity: it guesses t + 1
    result = runner.invoke(app, args + ["--iters", "100", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "medusa_state.json").read_text())["step"] == 100

    model, _ = load(str(out))
    assert model.medusa is not None and model.medusa.config.num_heads == 2
    accepted = forwards = 0
    for i in range(4):  # training prompts: the heads saw these continuations
        prompt = random_prompt(6, seed=100 + i)
        tokens, steps = decode_tokens(model, prompt, 24, drafter=make_drafter(
            model, TreeSettings((2, 1), None), source="medusa"))
        assert tokens == reference_tokens(model.base, prompt, 24)
        accepted += sum(s.accepted for s in steps[1:])
        forwards += len(steps) - 1
    assert accepted / forwards > 0.5, (accepted, forwards)
    result = runner.invoke(app, ["generate", "--model", str(out), "--drafts", "medusa", "-p", "go 1",
                                 "-m", "12"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "--model", str(ckpt), "--drafts", "medusa", "-p", "go 1"])
    assert result.exit_code != 0 and "no Medusa heads" in result.output
    result = runner.invoke(app, ["generate", "--model", str(ckpt), "--drafts", "hydra", "-p", "go 1"])
    assert result.exit_code == 2 and "--drafts" in result.output


def test_train_heads_data_tokens_is_checked_on_resume(tmp_path):
    ckpt, data = checkpoint_with_own_data(tmp_path)
    runner = CliRunner()
    out = tmp_path / "medusa"
    args = ["train-heads", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--num-heads", "2",
            "--batch-size", "4", "--max-seq-len", "64", "--warmup", "1", "--save-every", "2"]
    result = runner.invoke(app, args + ["--iters", "2", "--data-tokens", "100"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "medusa_state.json").read_text())["config"]["data_tokens"] == 100
    result = runner.invoke(app, args + ["--iters", "4", "--resume"])
    assert result.exit_code != 0 and "--data-tokens 100" in result.output, result.output
    result = runner.invoke(app, args + ["--iters", "4", "--resume", "--data-tokens", "100"])
    assert result.exit_code == 0, result.output


def test_heads_config_refuses_zero_heads():
    with pytest.raises(ValueError, match="num_heads must be at least 1"):
        HeadsConfig(0, 64, 272, 4)


def test_medusa2_trains_heads_with_lora_in_shared_mode_and_decodes_its_own_text(tmp_path):
    """Medusa-2 (`train --medusa-heads`): heads and LoRA trained together with the main
    loss. The output model drafts with its heads, and its text is its own greedy text."""
    ckpt, data = checkpoint_with_own_data(tmp_path)
    runner = CliRunner()
    out = tmp_path / "medusa2"
    args = ["train", "--model", str(ckpt), "--fresh-streams", "--mode", "shared", "--data", str(data),
            "--out", str(out), "--medusa-heads", "2", "--stream-weight", "0", "--exit-weight", "0",
            "--lora-rank", "4", "--batch-size", "8", "--max-seq-len", "64", "--learning-rate", "5e-3",
            "--warmup", "5", "--save-every", "30"]
    result = runner.invoke(app, args + ["--iters", "60"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{"):])
    assert figures["medusa_1_acc"] > 0.2 and "medusa_2_loss" in figures and "stream_1_loss" not in figures
    result = runner.invoke(app, args + ["--iters", "80", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_state.json").read_text())["step"] == 80

    model, _ = load(str(out))
    assert model.config.shared and model.medusa is not None and model.medusa.config.num_heads == 2
    accepted = forwards = 0
    for i in range(4):  # training prompts
        prompt = random_prompt(6, seed=100 + i)
        tokens, steps = decode_tokens(model, prompt, 24, drafter=make_drafter(
            model, TreeSettings((2, 1), None), source="medusa"))
        assert tokens == reference_tokens(model.base, prompt, 24)  # the trained model's own text
        accepted += sum(s.accepted for s in steps[1:])
        forwards += len(steps) - 1
    assert accepted / forwards > 0.5, (accepted, forwards)
    # Medusa-2 needs shared mode: in lossless mode the heads are train-heads' (Medusa-1).
    result = runner.invoke(app, ["train", "--model", str(ckpt), "--data", str(data), "--out",
                                 str(tmp_path / "refused"), "--medusa-heads", "2", "--iters", "1"])
    assert result.exit_code != 0 and "train-heads --kind medusa" in result.output
