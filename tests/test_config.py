"""Settings written once (``config.py``) and checked once (at the library boundary)."""

import inspect

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from .helpers import write_base
from specstream_mlx import loading
from specstream_mlx.bench.run import BenchError, BenchSettings, check_methods
from specstream_mlx.cli import app
from specstream_mlx.cli.app import _parse_widths
from specstream_mlx.config import (
    DEFAULT_ADAPTER_RANK, DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS, DEFAULT_STREAM_LORA_RANK, MODES,
    SpecStreamConfig, TreeSettings,
)
from specstream_mlx.convert import pipeline

runner = CliRunner()


# --- defaults ------------------------------------------------------------------------------

def _defaults(fn, *names):
    params = inspect.signature(fn).parameters
    return tuple(params[n].default for n in names)


def _option(command: str, name: str):
    params = {p.name: p for p in get_command(app).commands[command].params}
    return params[name]


def test_library_defaults_are_configs():
    want = (DEFAULT_GAMMA, DEFAULT_STREAM_LAYERS, DEFAULT_MODE)
    assert _defaults(loading.init_checkpoint, "gamma", "stream_layers", "mode") == want
    assert _defaults(loading.new_config, "gamma", "stream_layers", "mode") == want
    assert _defaults(pipeline.convert, "gamma", "stream_layers", "mode") == want
    config = SpecStreamConfig()
    assert (config.gamma, config.stream_layers, config.mode) == want
    assert config.tree == TreeSettings()
    assert loading.FRESH_DEFAULTS == {"gamma": DEFAULT_GAMMA, "stream_layers": DEFAULT_STREAM_LAYERS,
                                      "stream_adapter_rank": DEFAULT_ADAPTER_RANK,
                                      "stream_lora_rank": DEFAULT_STREAM_LORA_RANK}


@pytest.mark.parametrize("command", ["init", "convert"])
def test_cli_defaults_are_configs(command):
    assert _option(command, "gamma").default == DEFAULT_GAMMA
    assert _option(command, "stream_layers").default == DEFAULT_STREAM_LAYERS
    assert _option(command, "mode").default == DEFAULT_MODE
    assert " | ".join(MODES) in _option(command, "mode").help


def test_help_texts_state_the_configs_defaults():
    assert f"default {DEFAULT_GAMMA})" in _option("train", "gamma").help
    assert f"default {DEFAULT_STREAM_LAYERS})" in _option("train", "stream_layers").help
    assert f"default {DEFAULT_ADAPTER_RANK})" in _option("train", "adapter_rank").help
    assert f"default {DEFAULT_STREAM_LORA_RANK}:" in _option("train", "stream_lora_rank").help
    widths = ",".join(map(str, TreeSettings().widths))
    for command in ("generate", "bench"):
        assert widths in _option(command, "tree_width").help
    assert _option("bench-kernel", "gamma").default == DEFAULT_GAMMA


def test_new_config_cuts_the_default_tree_to_gamma():
    config = loading.new_config((64, 272, 4), gamma=2)
    assert config.tree == TreeSettings().cut(2) and len(config.tree.widths) == 2
    kept = TreeSettings((2, 2, 2), 5, prune_threshold=0.1, prune_max_keep=3)
    assert loading.new_config((64, 272, 4), gamma=2, tree=kept).tree == TreeSettings((2, 2), 5, 0.1, 3)


def test_shared_is_the_one_mode_test():
    assert SpecStreamConfig(mode="shared").shared and not SpecStreamConfig().shared
    assert not SpecStreamConfig(mode=DEFAULT_MODE).shared


# --- validation at the library boundary ----------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (3, 0)}, "tree widths must be >= 1"),
    ({"max_nodes": 0}, "max_nodes must be >= 1"),
    ({"prune_max_keep": 0}, "prune_max_keep must be >= 1"),
])
def test_tree_settings_check_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeSettings(**kwargs)


def test_parse_widths_only_parses():
    assert _parse_widths("3, 2,1") == (3, 2, 1)
    assert _parse_widths("0,1") == (0, 1)  # values are TreeSettings' to refuse
    assert _parse_widths(None) is None
    with pytest.raises(ValueError, match="--tree-width takes comma-separated integers"):
        _parse_widths("3,x")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"methods": ["ar", "hydra"]}, BenchError, "unknown method 'hydra'"),
    ({"methods": []}, BenchError, "no methods to run"),
    ({"max_tokens": 0}, BenchError, "max_tokens must be at least 1, got 0"),
    ({"num_prompts": 0}, BenchError, "num_prompts must be at least 1, got 0"),
    ({"num_draft_tokens": 0}, BenchError, "num_draft_tokens must be at least 1"),
    ({"pld_max_ngram": 0}, BenchError, "pld_max_ngram must be at least 1"),
    ({"pld_tokens": 0}, BenchError, "pld_tokens must be at least 1"),
    ({"warmup_tokens": -1}, BenchError, "warmup_tokens must be >= 0"),
    ({"temp": -1.0}, ValueError, "temperature"),
    ({"top_p": 2.0}, ValueError, "top-p"),
    ({"max_nodes": 0}, ValueError, "max_nodes must be >= 1"),
    ({"tree_widths": (2, 0)}, ValueError, "tree widths must be >= 1"),
    ({"sweep_widths": [(1, 0)]}, ValueError, "tree widths must be >= 1"),
])
def test_bench_settings_check_themselves(kwargs, error, message):
    with pytest.raises(error, match=message):
        BenchSettings(model="m", data="d", **kwargs)


def test_bench_settings_accept_good_values():
    BenchSettings(model="m", data="d")
    BenchSettings(model="m", data="d", methods=[], sweep_widths=[(1,)], sweep_max_nodes=[None, 4],
                  warmup_tokens=0, num_prompts=1, max_tokens=1, tree_widths=(2, 1), max_nodes=3)
    assert check_methods(["ss", "ar"]) == ["ss", "ar"]


# --- the command line names its option for the library's refusal ---------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    base = write_base(root / "base", "llama", seed=5)
    return loading.init_checkpoint(str(base), str(root / "ss"), stream_layers=2)


@pytest.mark.parametrize("args, message", [
    (["-m", "0"], "--max-tokens must be at least 1, got 0"),
    (["--temp", "-1"], "--temp must be a finite number >= 0"),
    (["--top-p", "2"], "--top-p must be in [0, 1]"),
    (["--max-nodes", "0"], "--max-nodes must be >= 1"),
    (["--tree-width", "2,0"], "--tree-width must be >= 1"),
    (["--lookup", "-1"], "--lookup takes a number of tokens >= 0"),
])
def test_generate_names_the_option_the_library_refused(checkpoint, args, message):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "-p", "hi", *args])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_library_names_stay_when_the_command_lacks_the_option(checkpoint, tmp_path):
    """``init`` has no --max-nodes: a checkpoint error keeps the library's words (exit 1)."""
    result = runner.invoke(app, ["init", "--model", str(checkpoint), "--out", str(tmp_path / "o"),
                                 "--stream-layers", "9"])
    assert result.exit_code == 1 and "stream_layers must be in 1..4" in result.output
