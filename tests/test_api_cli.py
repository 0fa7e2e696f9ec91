"""The embeddable API and the CLI, end to end on a tiny checkpoint written to disk."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from .helpers import write_base
from specstream_mlx import generate, load, stream_generate
from specstream_mlx.cli import app
from specstream_mlx.config import CheckpointError, TreeSettings
from specstream_mlx.decode import ContextOverflowError
from specstream_mlx.drafters import make_drafter
from specstream_mlx.loading import init_checkpoint

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = write_base(root / "base", "llama", seed=2)
    return init_checkpoint(str(base), str(root / "ss"), gamma=3, stream_layers=2)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(str(checkpoint))


def _mlx_lm_text(checkpoint, prompt, max_tokens):
    from mlx_lm import generate as lm_generate
    from mlx_lm import load as lm_load

    base, tokenizer = lm_load(str(checkpoint))
    return lm_generate(base, tokenizer, prompt, max_tokens=max_tokens)


def test_generate_equals_mlx_lm_text(checkpoint, loaded):
    model, tokenizer = loaded
    want = _mlx_lm_text(checkpoint, PROMPT, 40)
    assert generate(model, tokenizer, PROMPT, max_tokens=40) == want
    assert generate(model, tokenizer, PROMPT, max_tokens=40,
                    drafter=make_drafter(model, speculative=False)) == want
    assert generate(model, tokenizer, PROMPT, max_tokens=40,
                    drafter=make_drafter(model, TreeSettings((1, 1, 1), None))) == want


def test_stream_generate_stats(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20))
    last = responses[-1]
    assert len(responses) == 20 and last.generation_tokens == 20
    assert last.finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.forwards >= 1 and 1.0 <= last.tokens_per_forward <= 4.0
    # 19 tokens after the prefill's came from `forwards` forwards.
    assert last.tokens_per_forward == pytest.approx(19 / last.forwards)
    assert len(last.acceptance_by_depth) == 3
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert set(last.stats()) >= {"generation_tokens", "generation_tps", "forwards",
                                 "tokens_per_forward", "acceptance_by_depth",
                                 "prompt_tokens", "prompt_tps", "peak_memory_gb"}


def test_stops_on_eos(loaded):
    model, tokenizer = loaded
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=30)]
    stop_at = 6
    eos = tokens[stop_at]
    if eos in tokens[:stop_at]:
        pytest.skip("chosen EOS occurs earlier; pick another position")
    saved = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = {eos}
    try:
        out = list(stream_generate(model, tokenizer, PROMPT, max_tokens=30))
    finally:
        tokenizer.eos_token_ids = saved
    assert [r.token for r in out[:-1]] == tokens[:stop_at]
    assert out[-1].finish_reason == "stop" and out[-1].token == eos
    assert out[-1].generation_tokens == stop_at


def test_api_bad_input(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [], max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, tokenizer, PROMPT, max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, PROMPT, max_tokens=5, temp=-0.5)
    with pytest.raises(ContextOverflowError, match="context"):
        generate(model, tokenizer, list(range(100)) * 21, max_tokens=5)


def test_cli_end_to_end(tmp_path):
    """`init` then `generate` through the installed entry point, in a subprocess."""
    base = write_base(tmp_path / "base", "qwen2", seed=3)
    out = tmp_path / "ss"
    cmd = [sys.executable, "-m", "specstream_mlx"]
    done = subprocess.run(cmd + ["init", "--model", str(base), "--out", str(out),
                                 "--stream-layers", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "specstream.json").is_file() and (out / "specstream.safetensors").is_file()

    stats = tmp_path / "stats.json"
    args = ["generate", "--model", str(out), "-p", "hello there", "-m", "16",
            "--stats-json", str(stats), "--verbose"]
    spec = subprocess.run(cmd + args, capture_output=True, text=True)
    assert spec.returncode == 0, spec.stderr
    assert "tokens per forward" in spec.stdout and "backend cpu" in spec.stderr
    assert "tree 3,2,1 max nodes 16 (checkpoint default: fallback)" in spec.stderr
    figures = json.loads(stats.read_text())
    assert figures["generation_tokens"] == 16 and figures["forwards"] >= 1
    plain = subprocess.run(cmd + args + ["--no-spec"], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split("\n==========")[0] == spec.stdout.split("\n==========")[0]
    assert json.loads(stats.read_text())["tokens_per_forward"] == 1.0
    lookup = subprocess.run(cmd + args + ["--lookup", "4"], capture_output=True, text=True)
    assert lookup.returncode == 0, lookup.stderr
    assert lookup.stdout.split("\n==========")[0] == spec.stdout.split("\n==========")[0]
    assert len(json.loads(stats.read_text())["acceptance_by_depth"]) == 4  # the lookup's depth


runner = CliRunner()


def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    text = result.output
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert match in lines[0], text


def test_cli_bad_input(tmp_path, checkpoint):
    gen = ["generate", "-p", "hi", "--model"]
    _fails_cleanly(gen + [str(tmp_path / "nope")], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _fails_cleanly(gen + [str(empty)], "no model weights")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "  "], "empty")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "hi", "-m", "0"],
                   "--max-tokens")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "hi", "--temp", "-1"],
                   "--temp")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "x" * 2100], "context")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "hi",
                    "--tree-width", "3,x"], "--tree-width")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "hi", "--lookup", "-1"],
                   "--lookup")
    _fails_cleanly(["generate", "--model", str(checkpoint), "-p", "hi", "--lookup", "4",
                    "--no-spec"], "--no-spec")


def _copy(checkpoint, dest):
    import shutil

    shutil.copytree(checkpoint, dest)
    return dest


def test_cli_bad_checkpoints(tmp_path, checkpoint):
    corrupt = _copy(checkpoint, tmp_path / "corrupt")
    data = (corrupt / "specstream.safetensors").read_bytes()
    (corrupt / "specstream.safetensors").write_bytes(data[: len(data) // 2])
    _fails_cleanly(["generate", "--model", str(corrupt), "-p", "hi"], "corrupt")

    wrong = _copy(checkpoint, tmp_path / "wrong-shape")
    weights = mx.load(str(wrong / "specstream.safetensors"))
    weights["stream_embeddings"] = mx.zeros((3, 32))
    mx.save_safetensors(str(wrong / "specstream.safetensors"), weights)
    _fails_cleanly(["generate", "--model", str(wrong), "-p", "hi"], "shape")

    mismatch = _copy(checkpoint, tmp_path / "mismatch")
    config = json.loads((mismatch / "specstream.json").read_text())
    config["vocab_size"] = 999
    (mismatch / "specstream.json").write_text(json.dumps(config))
    _fails_cleanly(["generate", "--model", str(mismatch), "-p", "hi"], "vocabulary size")

    version = _copy(checkpoint, tmp_path / "version")
    config = json.loads((version / "specstream.json").read_text())
    config["format_version"] = 99
    (version / "specstream.json").write_text(json.dumps(config))
    _fails_cleanly(["generate", "--model", str(version), "-p", "hi"], "format_version")

    alien = _copy(checkpoint, tmp_path / "alien")
    config = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps(dict(config, model_type="mamba")))
    _fails_cleanly(["generate", "--model", str(alien), "-p", "hi"], "unsupported architecture")

    plain = tmp_path / "plain"
    write_base(plain, "llama")
    _fails_cleanly(["generate", "--model", str(plain), "-p", "hi"], "specstream-mlx init")


def test_cli_init_errors(tmp_path, checkpoint):
    base = write_base(tmp_path / "base", "llama")
    config = json.loads((base / "config.json").read_text())
    alien = tmp_path / "alien"
    alien.mkdir()
    for f in base.iterdir():
        (alien / f.name).write_bytes(f.read_bytes())
    (alien / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    _fails_cleanly(["init", "--model", str(alien), "--out", str(tmp_path / "o1")],
                   "unsupported architecture 'gpt2'")
    _fails_cleanly(["init", "--model", str(base), "--out", str(checkpoint)], "already exists")
    _fails_cleanly(["init", "--model", str(base), "--out", str(tmp_path / "o2"),
                    "--stream-layers", "9"], "stream_layers")
    _fails_cleanly(["init", "--model", str(base), "--out", str(tmp_path / "o3"),
                    "--mode", "fast"], "mode")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".o")]
    assert not leftovers and not (tmp_path / "o2").exists()


def test_hub_failure_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hugging Face hub"):
        load("no-such-org/no-such-model")


def test_the_embedded_model_has_a_name_and_is_the_default(checkpoint, monkeypatch, tmp_path):
    """`--model smollm2-135m`, and no --model at all, both mean the embedded model (eval, bench)."""
    from specstream_mlx.convert import default_model

    monkeypatch.setattr(default_model, "default_model_path", lambda *a, **k: checkpoint)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a b c", "completion": "d e"}) + "\n")
    runner = CliRunner()
    outputs = []
    for model in (["--model", default_model.MODEL_NAME], []):
        result = runner.invoke(app, ["eval", *model, "--data", str(data), "-m", "4"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.output[result.output.index("{"):])["quality"])
    assert outputs[0] == outputs[1]
    result = runner.invoke(app, ["bench", "--data", str(data), "--methods", "ss", "-m", "4",
                                 "--warmup-tokens", "0", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["settings"]["model"] == str(checkpoint)
    # any other name is still a folder or hub id
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data", str(data)])
    assert result.exit_code != 0 and "nope" in result.output
