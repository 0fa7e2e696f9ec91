"""Sharded runs: two local ranks over MLX's ring backend decode exactly what one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from .helpers import base_model, reference_tokens, write_base
from specstream_mlx import shard as sharding
from specstream_mlx.cli import app
from specstream_mlx.decode import ContextOverflowError

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
LAUNCH = BIN / "mlx.launch"

needs_launch = pytest.mark.skipif(not LAUNCH.is_file(), reason="mlx.launch is not installed beside python")


def _launch(args, ranks=2, timeout=240, env=None):
    """Run ``args`` (a script and its arguments) on ``ranks`` local ranks; (returncode, output)."""
    cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--python", sys.executable, "--", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stdout + done.stderr


def _checkpoint(root: Path, family: str = "llama") -> Path:
    base = write_base(root / f"base-{family}", family)
    ckpt = root / f"ckpt-{family}"
    result = CliRunner().invoke(app, ["init", "--model", str(base), "--out", str(ckpt), "--stream-layers", "2"])
    assert result.exit_code == 0, result.output
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("shard"))


@needs_launch
@pytest.mark.parametrize("mode, family", [("tensor", "llama"), ("pipeline", "qwen2")])
def test_two_ranks_decode_what_one_process_does(tmp_path, mode, family):
    ckpt = _checkpoint(tmp_path, family)
    code, output = _launch([HERE / "shard_worker.py", ckpt, tmp_path, mode])
    assert code == 0, output
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # same tokens everywhere, sampling included (checked per step too)
    from specstream_mlx.loading import load
    from .shard_worker import PROMPTS

    single, _ = load(str(ckpt))
    for i, prompt in enumerate(PROMPTS):
        expected = reference_tokens(single.base, prompt, 16)
        for name in ("tree", "chain", "plain"):
            assert ranks[0][name][i]["tokens"] == expected, (name, i)
        assert ranks[0]["plain"][i]["tokens_per_forward"] == 1.0
        assert 1 <= len(ranks[0]["sampled"][i]["tokens"]) <= 16  # sampling may draw the end token


@needs_launch
def test_cli_generate_prints_once_under_mlx_launch(ckpt, tmp_path):
    stats = tmp_path / "stats.json"
    code, output = _launch([BIN / "specstream-mlx", "generate", "--model", ckpt, "--shard", "tensor",
                            "-p", "hello", "-m", "8", "--ignore-chat-template", "--stats-json", stats])
    assert code == 0, output
    assert output.count("tokens per forward") == 1, output  # the statistics: rank 0 only
    assert json.loads(stats.read_text())["generation_tokens"] == 8


@needs_launch
def test_ranks_with_different_checkpoints_are_refused(tmp_path):
    first = _checkpoint(tmp_path / "a")
    second = _checkpoint(tmp_path / "b")
    mx.save_safetensors(str(second / "specstream.safetensors"),
                        {k: v + 1 for k, v in mx.load(str(second / "specstream.safetensors")).items()})
    # rank r reads the folder named by SHARD_TEST_CKPT_<r>
    script = tmp_path / "two.py"
    script.write_text("import os, mlx.core as mx\nfrom specstream_mlx.loading import load\n"
                      "r = mx.distributed.init().rank()\n"
                      "load(os.environ[f'SHARD_TEST_CKPT_{r}'], shard='tensor')\n")
    code, output = _launch([script], env={"SHARD_TEST_CKPT_0": str(first), "SHARD_TEST_CKPT_1": str(second)})
    # (mlx.launch 0.32 exits 0 even when a rank fails: the message is what counts)
    assert "ranks [1] load a different checkpoint from rank 0" in output, output


@needs_launch
def test_a_family_without_shard_is_refused_by_name(tmp_path):
    ckpt = _checkpoint(tmp_path, "phi3")
    code, output = _launch([BIN / "specstream-mlx", "generate", "--model", ckpt, "--shard", "tensor",
                            "-p", "hi", "-m", "2"])
    assert "cannot split 'phi3' models" in output and "llama, mistral, qwen2, qwen3" in output, output


def test_shard_without_mlx_launch_says_how_to_start(ckpt):
    result = CliRunner().invoke(app, ["generate", "--model", str(ckpt), "--shard", "tensor", "-p", "hi"])
    assert result.exit_code != 0
    assert "this process runs alone: start it with `mlx.launch -n 2" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", "--model", str(ckpt), "--shard", "rows", "-p", "hi"])
    assert result.exit_code == 2 and "--shard must be one of tensor, pipeline" in result.output, result.output


class _World:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def test_head_counts_must_divide_among_the_ranks():
    base, _ = base_model("llama")  # 4 query heads, 2 kv heads, 4 layers
    sharding.check_shardable(base, "tensor", _World(2))
    with pytest.raises(sharding.ShardError, match="num_attention_heads divisible by 3; this model has 4"):
        sharding.check_shardable(base, "tensor", _World(3))
    with pytest.raises(sharding.ShardError, match="cannot pipeline 'llama' models .*works for qwen2"):
        sharding.check_shardable(base, "pipeline", _World(2))
    qwen, _ = base_model("qwen2")
    with pytest.raises(sharding.ShardError, match="one layer per rank: 4 layers, 5 ranks"):
        sharding.check_shardable(qwen, "pipeline", _World(5))


def test_prompt_over_the_context_stops_every_rank():
    world = mx.distributed.init()  # one rank: the checks are the same gathers
    sharding.check_prompt_fits([1] * 2000, 48, 2048, world)
    with pytest.raises(ContextOverflowError, match="exceeds the model's context of 2048 tokens on ranks \\[0\\]"):
        sharding.check_prompt_fits([1] * 2000, 49, 2048, world)


def test_seeds_arrive_whole_and_unreadable_checkpoints_stop_every_rank():
    world = mx.distributed.init()
    for seed in (0, 7, 2**31 + 3, 2**63 - 1):
        assert sharding.agree_seed(seed, world) == seed
    with pytest.raises(sharding.ShardError, match="ranks \\[0\\] could not read the checkpoint \\(gone\\)"):
        sharding.check_same_checkpoint(None, world, OSError("gone"))


def test_a_follower_survives_a_failed_request():
    """A request that fails on every rank must not end a follower (rank 0's engine goes on)."""
    from .helpers import ss_model
    from specstream_mlx.serve.worker import follow

    class Channel:
        def __init__(self):
            self.requests = [{"prompt_tokens": [], "max_tokens": 4, "sampling": {"temp": 0.0}, "seed": None},
                             {"prompt_tokens": [5, 6, 7], "max_tokens": 3, "sampling": {"temp": 0.0}, "seed": None},
                             None]
            self.flags = 0

        def share(self, value=None):
            return self.requests.pop(0)

        def flag(self, value=False):
            self.flags += 1
            return True

    channel = Channel()
    model = ss_model("llama")
    follow(model, _Tok(), channel)
    assert channel.requests == [] and channel.flags == 3  # the second request ran its 3 tokens


class _Tok:
    """Just enough tokenizer for stream_generate on token ids."""

    eos_token_ids = []

    class detokenizer:
        last_segment = ""

        @staticmethod
        def reset():
            pass

        @staticmethod
        def add_token(token):
            pass

        @staticmethod
        def finalize():
            pass


def test_checkpoint_fingerprint_sees_weights_and_streams(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    assert sharding.checkpoint_fingerprint(copy) == sharding.checkpoint_fingerprint(ckpt)
    (copy / "specstream.json").write_text((copy / "specstream.json").read_text().replace("3", "4", 1))
    assert sharding.checkpoint_fingerprint(copy) != sharding.checkpoint_fingerprint(ckpt)


@needs_launch
@pytest.mark.parametrize("mode, family", [("tensor", "llama"), ("pipeline", "qwen2")])
def test_bench_under_mlx_launch_counts_collectives(tmp_path, mode, family):
    ckpt = _checkpoint(tmp_path, family)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one two", "three four five")))
    out = tmp_path / "bench"
    code, output = _launch([BIN / "specstream-mlx", "bench", "--model", ckpt, "--shard", mode,
                            "--data", data, "--methods", "ar,ss,pld", "-m", "8", "--warmup-tokens", "2",
                            "--ignore-chat-template", "--out", out])
    assert code == 0 and (out / "results.json").is_file(), output
    assert output.count("| method |") == 1, output  # rank 0 alone prints the table
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["ranks"] == 2 and results["settings"]["shard"] == mode
    methods = results["methods"]
    assert methods["ss"]["equal_to_ar"] and methods["pld"]["equal_to_ar"]
    # tensor: 4 layers x 2 sharded-to-all linears per forward, so at least 8 all_sums per
    # token for ar; pipeline: at least one hand-over per forward
    assert methods["ar"]["collectives_per_token"] >= (8 if mode == "tensor" else 1)
    assert methods["ss"]["collectives_per_token"] > 0


def test_bench_refuses_draft_with_shard():
    from specstream_mlx.bench.run import BenchError, BenchSettings

    with pytest.raises(BenchError, match="draft .* is not run with --shard"):
        BenchSettings(model="m", data="d", shard="tensor")


@needs_launch
def test_server_under_mlx_launch_answers_like_one_process(tmp_path):
    from .serving import ServerProcess, chat_body, request, stream, streamed_text, write_text_checkpoint

    ckpt = write_text_checkpoint(tmp_path)
    launcher = [str(LAUNCH), "-n", "2", "--backend", "ring", "--python", sys.executable, "--",
                str(BIN / "specstream-mlx")]
    answers = {}
    for name, extra in (("single", {}), ("sharded", {"launcher": launcher})):
        args = ("--shard", "tensor") if name == "sharded" else ()
        server = ServerProcess(ckpt, *args, timeout=180, **extra)
        try:
            status, body = request(server.port, "POST", "/v1/chat/completions",
                                   chat_body("hello there", max_tokens=12))
            assert status == 200, (body, server.stderr())
            # a stop string ends the request early on rank 0, and the other rank with it
            status, events = stream(server.port, "/v1/chat/completions",
                                    chat_body("a second one", max_tokens=12, stop=[body["choices"][0]["message"]["content"][2:4]]))
            assert status == 200, server.stderr()
            status, again = request(server.port, "POST", "/v1/chat/completions",
                                    chat_body("hello there", max_tokens=12, temperature=0.8, seed=5))
            assert status == 200, server.stderr()
            answers[name] = (body["choices"][0]["message"]["content"], streamed_text(events),
                             again["choices"][0]["message"]["content"])
        finally:
            server.stop()
    assert answers["sharded"][:2] == answers["single"][:2]
    assert answers["sharded"][2]  # sampled: same draws on both ranks (else RankCheck stops it)
