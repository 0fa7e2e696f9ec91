"""`specstream-mlx bench`: end to end on a tiny checkpoint, its figures, its errors."""

import json

import pytest
from typer.testing import CliRunner

from .helpers import CONFIGS, write_base, write_tokenizer
from specstream_mlx.bench.run import BenchError, Run, _steps_from_flags, parse_methods, sweep_settings
from specstream_mlx.bench.prompts import load_prompts
from specstream_mlx.bench.report import best_sweep, summarize
from specstream_mlx.config import CheckpointError, TreeSettings, read_config, save_backend_tree
from specstream_mlx.config import tree_settings
from specstream_mlx.cli import app
from specstream_mlx.loading import init_checkpoint

PROMPTS = [
    {"prompt": "the cat sat on the mat. the cat sat on the"},
    {"messages": [{"role": "user", "content": "abc abc abc abc"},
                  {"role": "assistant", "content": "a reference answer"}]},
    {"text": "one two one two one two"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = write_base(root / "base", "llama", seed=3)
    return init_checkpoint(str(base), str(root / "ss"), gamma=3, stream_layers=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n\n")
    return path


def _weight_bytes(config: dict) -> int:
    """Bytes of a float32 llama-like model of ``config`` (tied embeddings), from its shapes."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return 4 * (layers * layer + config["vocab_size"] * hidden + hidden)


def _bench(args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def full_run(checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = _bench(["--model", checkpoint, "--data", data, "--max-tokens", 20,
                     "--warmup-tokens", 4, "--out", out, "--device-report"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_bench_writes_results_table_and_plot(full_run, checkpoint):
    out, output = full_run
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert list(methods) == ["ar", "ss", "ss-chain", "pld", "ss-pld", "draft"]
    assert results["command"].startswith(f"specstream-mlx bench --model {checkpoint}")
    assert "--max-tokens 20" in results["command"] and "--seed 0" in results["command"]
    assert results["environment"]["mlx"] and results["environment"]["backend"] == "cpu"
    assert results["settings"]["tree"] == {"widths": [3, 2, 1], "max_nodes": 16,
                                           "prune_threshold": None}
    # The figures against what each run did (per-prompt records in results.json): 20 tokens
    # per prompt (no EOS from this model), the forwards each run made, its timings.
    weights = _weight_bytes(CONFIGS["llama"])
    for name, entry in methods.items():
        runs = [p["runs"][name] for p in results["prompts"]]
        assert entry["prompts"] == 3 and [len(r["tokens"]) for r in runs] == [20, 20, 20], name
        assert entry["tokens"] == 60
        forwards = sum(r["forwards"] for r in runs)
        # ar: one forward per token; draft: tokens per target step; the SS loop counts the
        # tokens of its decode forwards (the prefill's first token is not one of them).
        used = {"ar": 60, "draft": 60}.get(name, 60 - 3)
        assert entry["tokens_per_forward"] == pytest.approx(used / forwards), name
        # each forward emits at least one token; ar exactly one
        assert (forwards == 60) if name == "ar" else (0 < forwards <= used), (name, forwards)
        tps = sorted(r["tps"] for r in runs)
        assert entry["tps"]["median"] == tps[1] and entry["tps"]["min"] == tps[0] > 0
        ttft = sorted(r["ttft_s"] for r in runs)
        assert entry["ttft_s"]["median"] == ttft[1] and entry["ttft_s"]["min"] == ttft[0] > 0
        assert entry["peak_memory_gb"] == max(r["peak_memory_gb"] for r in runs)
        assert entry["peak_memory_gb"] >= weights / 1e9  # the weights it reads are counted
        depth = entry["acceptance_by_depth"]
        assert all(1 >= a >= b >= 0 for a, b in zip(depth, depth[1:] + [0])), (name, depth)
    assert methods["ar"]["tokens_per_forward"] == 1.0
    assert methods["ar"]["speedup"]["median"] == pytest.approx(1.0)
    assert len(methods["ss"]["acceptance_by_depth"]) == 3
    assert len(methods["pld"]["acceptance_by_depth"]) == 4
    assert len(methods["ss-pld"]["acceptance_by_depth"]) == 4  # max(tree depth 3, 4 lookup tokens)
    assert len(methods["draft"]["acceptance_by_depth"]) == 3
    # the draft model is a 4-bit copy: smaller than the target's float32 weights
    assert methods["draft"]["peak_memory_gb"] < 2 * methods["ar"]["peak_memory_gb"]
    device = results["device"]
    assert device["weight_bytes"] == weights  # the float32 base model's parameters
    assert device["bandwidth_gbps"] > 0
    assert device["upper_bound_tps"] == pytest.approx(device["bandwidth_gbps"] * 1e9
                                                      / device["weight_bytes"])
    table = (out / "results.md").read_text()
    assert table in output or table.strip() in output
    for name in methods:
        assert f"| {name} |" in table
    assert "## Device" in table and "upper bound" in table
    assert device["exp_ns"] > 0 and device["add_ns"] > 0 and "exp " in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_lossless_methods_reproduce_ar_tokens(full_run):
    out, _ = full_run
    results = json.loads((out / "results.json").read_text())
    for prompt in results["prompts"]:
        runs = prompt["runs"]
        assert len(runs["ar"]["tokens"]) == 20 and runs["ar"]["forwards"] == 20
        for name in ("ss", "ss-chain", "pld", "ss-pld"):
            assert runs[name]["tokens"] == runs["ar"]["tokens"], name
    for name in ("ss", "ss-chain", "pld", "ss-pld"):
        entry = results["methods"][name]
        assert entry["must_equal_ar"] and entry["equal_to_ar"] and entry["equal_prompts"] == 3
    assert "NO (must be equal)" not in (out / "results.md").read_text()


def test_seed_reproduces_sampled_tokens(checkpoint, data, tmp_path):
    tokens = []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / run
        result = _bench(["--model", checkpoint, "--data", data, "--max-tokens", 12,
                         "--methods", "ar,ss,pld", "--temp", 1.0, "--seed", seed, "--num-prompts", 2,
                         "--warmup-tokens", 2, "--out", out])
        assert result.exit_code == 0, result.output
        results = json.loads((out / "results.json").read_text())
        assert results["methods"]["ss"]["equal_to_ar"] is None  # sampling: not comparable
        tokens.append([p["runs"][m]["tokens"] for p in results["prompts"] for m in ("ar", "ss", "pld")])
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]  # another seed samples other tokens


def test_sweep_reports_every_setting(checkpoint, data, tmp_path):
    result = _bench(["--model", checkpoint, "--data", data, "--max-tokens", 8, "--num-prompts", 1,
                     "--sweep", "--sweep-widths", "1,1;2,2", "--sweep-max-nodes", "3,4,0",
                     "--warmup-tokens", 2, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    # caps 3 and 4 are the whole of (1,1); a cap of 3 on (2,2) is the chain (1,1)
    assert [(s["widths"], s["max_nodes"], s["nodes"]) for s in results["sweep"]] == [
        ([1, 1], None, 3), ([2, 2], 4, 4), ([2, 2], None, 7)]
    assert list(results["methods"]) == ["ar"] + [s["name"] for s in results["sweep"]]
    assert "## Tree sweep (ss)" in result.output and "best on this machine: `--tree-width" in result.output


def test_sweep_save_tree_sets_this_backends_default(checkpoint, data, tmp_path):
    import shutil

    model = shutil.copytree(checkpoint, tmp_path / "ss")
    result = _bench(["--model", model, "--data", data, "--max-tokens", 8, "--num-prompts", 1,
                     "--sweep", "--sweep-widths", "1;2,2", "--sweep-max-nodes", "0",
                     "--warmup-tokens", 2, "--out", tmp_path / "out", "--save-tree"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    best = best_sweep(results)
    assert best["speedup"] == max(results["methods"][s["name"]]["speedup"]["median"]
                                  for s in results["sweep"])
    config = read_config(model)
    saved = TreeSettings(tuple(best["widths"]), best["max_nodes"], None)
    assert config.tree_by_backend == {"cpu": saved}
    assert config.tree == read_config(checkpoint).tree  # the fallback is untouched
    assert f"as the cpu default in {model}" in result.output
    # the saved tree is what decoding on the CPU now uses; other backends keep the fallback
    assert tree_settings(config).widths == saved.widths
    assert tree_settings(config, on="gpu-cuda").widths == (3, 2, 1)
    assert tree_settings(config, widths=(1, 1)).widths == (1, 1)  # an explicit tree still wins
    rerun = _bench(["--model", model, "--data", data, "--max-tokens", 4, "--num-prompts", 1,
                    "--methods", "ss", "--warmup-tokens", 1, "--out", tmp_path / "out2"])
    assert rerun.exit_code == 0, rerun.output
    tree = json.loads((tmp_path / "out2" / "results.json").read_text())["settings"]["tree"]
    assert tree["widths"] == list(saved.widths) and tree["max_nodes"] == saved.max_nodes
    hub = _bench(["--model", "org/some-model", "--data", data, "--sweep", "--save-tree",
                  "--out", tmp_path / "out3"])
    assert hub.exit_code == 2 and "local checkpoint folder" in hub.output


def test_best_sweep_never_picks_a_lossless_mismatch():
    def entry(speed, equal):
        return {"speedup": {"median": speed}, "must_equal_ar": True, "equal_to_ar": equal}

    results = {"sweep": [{"name": "ss a", "widths": [1]}, {"name": "ss b", "widths": [2]}],
               "methods": {"ss a": entry(1.5, True), "ss b": entry(2.0, False)}}
    assert best_sweep(results)["name"] == "ss a"
    results["methods"]["ss a"] = entry(None, True)
    assert best_sweep(results) is None


def test_backend_trees_are_checked(checkpoint, tmp_path):
    import shutil

    model = shutil.copytree(checkpoint, tmp_path / "ss")
    with pytest.raises(CheckpointError, match="unknown backends"):
        save_backend_tree(model, "tpu", TreeSettings((1,), None, None))
    with pytest.raises(CheckpointError, match="exceeds gamma=3"):
        save_backend_tree(model, "gpu-cuda", TreeSettings((1, 1, 1, 1), None, None))
    assert read_config(model).tree_by_backend == {}  # a refused tree is not written
    save_backend_tree(model, "gpu-cuda", TreeSettings((4, 2, 1), 24, None))
    assert read_config(model).default_tree("gpu-cuda") == TreeSettings((4, 2, 1), 24, None)
    config = json.loads((model / "specstream.json").read_text())
    config["tree_by_backend"] = {"cpu": [1, 1]}
    (model / "specstream.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="malformed"):
        read_config(model)


def test_sweep_settings_cut_to_gamma_and_dedupe():
    # (3,2,1) capped at 4 is the chain (1,1,1); a cap of 100 is no cap
    got = sweep_settings([(3, 2, 1, 1), (1, 1, 1)], [4, 100, None], gamma=3)
    assert [(s.widths, s.max_nodes) for s in got] == [((1, 1, 1), None), ((3, 2, 1), None)]
    got = sweep_settings([(3, 2, 1)], [8], gamma=2)  # cut to (3, 2): 10 rows, so 8 caps
    assert [(s.widths, s.max_nodes) for s in got] == [((3, 2), 8), ((3, 2), None)]


def test_steps_from_draft_flags():
    # steps: 2 accepted + 1, 0 + 1, 1 + 1, then 3 accepted cut by max_tokens
    flags = [True, True, False, False, True, False, True, True, True]
    assert _steps_from_flags(flags) == [2, 0, 1, 3]


def test_summarize_figures():
    def run(tokens, decode_s, forwards, forward_tokens, hits):
        return Run(tokens, 0.01, decode_s, len(tokens), forwards, forward_tokens, hits, 0.1)

    runs = {
        "ar": [run([1, 2, 3, 4, 5], 0.4, 5, 5, []), run([6, 7, 8], 0.2, 3, 3, [])],
        "ss": [run([1, 2, 3, 4, 5], 0.1, 2, 4, [2, 1]), run([6, 7, 9], 0.1, 1, 2, [1, 0])],
    }
    out = summarize(runs, greedy=True, lossless=True)
    ar, ss = out["ar"], out["ss"]
    assert ar["tps"]["median"] == pytest.approx(10.0)  # (5-1)/0.4 and (3-1)/0.2
    assert ss["tps"]["min"] == pytest.approx(20.0) and ss["tps"]["max"] == pytest.approx(40.0)
    assert ss["speedup"]["median"] == pytest.approx(3.0)  # ratios 4 and 2
    assert ss["overall_speedup"] == pytest.approx((6 / 0.2) / (6 / 0.6))
    assert ss["tokens_per_forward"] == pytest.approx(6 / 3)
    assert ss["acceptance_by_depth"] == pytest.approx([3 / 3, 1 / 3])
    assert ss["equal_to_ar"] is False and ss["equal_prompts"] == 1
    assert ss["mismatches"] == [{"prompt": 1, "position": 2}]
    assert ss["must_equal_ar"] and not out["ar"]["must_equal_ar"]
    assert summarize(runs, greedy=False, lossless=True)["ss"]["equal_to_ar"] is None


def test_parse_methods():
    assert parse_methods("ar, ss,pld,ar") == ["ar", "ss", "pld"]
    assert parse_methods(None) is None
    assert parse_methods("ar,ss,medusa,eagle") == ["ar", "ss", "medusa", "eagle"]  # the peers (issue 19)
    with pytest.raises(BenchError, match="unknown method 'hydra'"):
        parse_methods("ar,hydra")


def test_load_prompts_formats(tmp_path):
    write_tokenizer(tmp_path)
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    prompts = load_prompts(str(path), tokenizer, None, 8, None)
    texts = [tokenizer.decode(p.tokens) for p in prompts]
    assert [p.line for p in prompts] == [1, 2, 3]
    assert texts[0].endswith("<user>the cat sat on the mat. the cat sat on the\n<assistant>")
    assert "reference answer" not in texts[1] and texts[1].endswith("abc abc\n<assistant>")
    assert len(load_prompts(str(path), tokenizer, 2, 8, None)) == 2
    raw = load_prompts(str(path), tokenizer, 1, 8, None, ignore_chat_template=True)
    assert tokenizer.decode(raw[0].tokens).endswith("the cat sat on the mat. the cat sat on the")


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("\n\n", "holds no records"),
    ('{"prompt": "ok"}\n{not json\n', ":2: not valid JSON"),
    ('{"completion": "x"}\n', ':1: expected a "prompt", "messages" or "text" field'),
    ('{"prompt": "  "}\n', ':1: "prompt" must be a non-empty string'),
    ('{"messages": []}\n', ':1: "messages" must be a non-empty list'),
])
def test_bad_data_files_fail_with_one_line(checkpoint, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = _bench(["--model", checkpoint, "--data", path, "--out", tmp_path / "o"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_prompt_longer_than_context_fails(checkpoint, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "x" * 2100}) + "\n")
    result = _bench(["--model", checkpoint, "--data", path, "--methods", "ss",
                     "--out", tmp_path / "o"])
    assert result.exit_code == 1
    assert "long.jsonl:2:" in result.output and "context of 2048" in result.output


@pytest.mark.parametrize("args, message", [
    (["--methods", "ar,hydra"], "unknown method 'hydra'"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--sweep", "--sweep-max-nodes", "x"], "--sweep-max-nodes takes integers"),
    (["--save-tree"], "--save-tree keeps the best tree of a sweep: add --sweep"),
])
def test_bad_options_are_usage_errors(checkpoint, data, tmp_path, args, message):
    result = _bench(["--model", checkpoint, "--data", data, "--out", tmp_path, *args])
    assert result.exit_code == 2 and message in result.output


def test_missing_data_file(checkpoint, tmp_path):
    result = _bench(["--model", checkpoint, "--data", tmp_path / "nope.jsonl", "--out", tmp_path])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_draft_model_option_counts_target_forwards(checkpoint, data, tmp_path):
    # The target's own base as the draft: greedy accepts every draft, so each
    # target forward emits num_draft_tokens + 1 = 4 tokens (20 = 5 steps of 4).
    result = _bench(["--model", checkpoint, "--data", data, "--methods", "ar,draft",
                     "--draft-model", checkpoint.parent / "base", "--max-tokens", 20,
                     "--num-prompts", 1, "--warmup-tokens", 2, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    draft = results["methods"]["draft"]
    assert results["prompts"][0]["runs"]["draft"]["forwards"] == 5
    assert draft["tokens_per_forward"] == pytest.approx(4.0)
    assert draft["acceptance_by_depth"] == pytest.approx([1.0, 1.0, 1.0])
    assert draft["equal_to_ar"] and not draft["must_equal_ar"]


def test_outputs_without_matplotlib(full_run, tmp_path, monkeypatch):
    import sys

    from specstream_mlx.bench.report import write_outputs

    results = json.loads((full_run[0] / "results.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    files = write_outputs(results, tmp_path / "plain")
    assert "pip install 'specstream-mlx[bench]'" in files["plot_skipped"]
    assert not (tmp_path / "plain" / "results.png").exists()
    assert json.loads(files["json"].read_text())["methods"] == results["methods"]
    assert "| ss |" in files["table"].read_text()


@pytest.mark.parametrize("args, message", [
    (["--pld-tokens", "0"], "--pld-tokens must be at least 1"),
    (["--pld-ngram", "0"], "--pld-ngram must be at least 1"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens must be at least 1"),
    (["--warmup-tokens", "-1"], "--warmup-tokens must be >= 0"),
    (["--temp", "-1"], "--temp must be a finite number >= 0"),
    (["--max-nodes", "0"], "--max-nodes must be >= 1"),
    (["--tree-width", "2,0"], "--tree-width must be >= 1"),
])
def test_options_the_settings_refuse_are_usage_errors(checkpoint, data, tmp_path, args, message):
    """BenchSettings checks them (before anything loads); the CLI names the option."""
    result = _bench(["--model", checkpoint, "--data", data, "--out", tmp_path / "o", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_no_warmup(checkpoint, data, tmp_path):
    result = _bench(["--model", checkpoint, "--data", data, "--max-tokens", 3, "--num-prompts", 1,
                     "--methods", "ss", "--warmup-tokens", 0, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert "warm-up" not in result.output
