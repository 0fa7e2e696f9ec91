"""Training: the streams learn, the right parameters get gradients, resume is exact."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from .helpers import (
    VOCAB, base_model, decode_tokens, random_prompt, reference_tokens, tiny_train_args, write_base,
    write_count_data,
)
from specstream_mlx.cli import app
from specstream_mlx.config import SpecStreamConfig
from specstream_mlx.train.data import DataError, Example, collate, first_target_tokens, load_examples
from specstream_mlx.config import TreeSettings
from specstream_mlx.families import family_for
from specstream_mlx.forward import forward, logits
from specstream_mlx.cache import make_cache
from specstream_mlx.loading import fresh_model
from specstream_mlx.train.losses import LossWeights, loss_fn, train_forward
from specstream_mlx.masks import chain_rows
from specstream_mlx.train.loop import TrainConfig, make_trainable, train, trainable_names


def _model(mode="lossless", adapter_rank=16, family="llama"):
    base, config = base_model(family)
    base.model.embed_tokens.weight = mx.random.normal(base.model.embed_tokens.weight.shape)
    spec = SpecStreamConfig(gamma=3, stream_layers=2, mode=mode, stream_adapter_rank=adapter_rank,
                            hidden_size=64, vocab_size=VOCAB, num_layers=4)
    return fresh_model(base, family_for(config["model_type"]), spec)


def _successor_corpus(n=64, length=48, seed=0):
    """Sequences following a fixed random successor function over 16 tokens."""
    rng = np.random.default_rng(seed)
    alphabet = rng.choice(256, size=16, replace=False)
    successor = dict(zip(alphabet, np.roll(rng.permutation(alphabet), 1)))
    examples = []
    for _ in range(n):
        x, seq = rng.choice(alphabet), []
        for _ in range(length):
            seq.append(int(x))
            x = successor[x]
        examples.append(Example(tuple(seq), 0))
    return examples


def _cycle(seed=0) -> dict:
    """A successor function over 16 tokens that is a single 16-cycle: ``f^k(x) != f^(k+1)(x)``
    for every token and every k, so the token k places ahead and the one k + 1 places ahead
    never agree (with a random permutation, fixed points and short cycles would let them)."""
    rng = np.random.default_rng(seed)
    order = rng.choice(256, size=16, replace=False)
    return {int(a): int(b) for a, b in zip(order, np.roll(order, -1))}


def _cycle_corpus(successor: dict, n=64, length=48, seed=0):
    rng = np.random.default_rng(seed)
    starts = rng.choice(sorted(successor), size=n)
    examples = []
    for x in starts:
        seq = []
        for _ in range(length):
            seq.append(int(x))
            x = successor[int(x)]
        examples.append(Example(tuple(seq), 0))
    return examples


def _ahead(successor: dict, x: int, k: int) -> int:
    for _ in range(k):
        x = successor[x]
    return x


@pytest.fixture
def base_dir(tmp_path):
    return write_base(tmp_path / "base", "llama")


def test_streams_learn_a_repetitive_corpus(tmp_path, base_dir):
    """Stream j must predict the token j + 1 places ahead. Checked outside the training code:
    the inference forward's stream logits against the corpus's own rule, on a corpus where the
    token j or j + 2 places ahead (a target shifted by one) is always a different token."""
    successor = _cycle()
    model = _model()
    config = TrainConfig(iters=80, batch_size=8, max_seq_len=48, learning_rate=1e-2, warmup=5,
                         report_every=80, save_every=1000)
    figures = train(model, _cycle_corpus(successor), config, base_dir, tmp_path / "out")
    for j in (1, 2, 3):
        assert figures[f"stream_{j}_acc"] > 0.8, figures
    hits = np.zeros((3, 3))  # stream j x target offset (j, j + 1, j + 2 places ahead)
    count = 0
    for example in _cycle_corpus(successor, n=4, length=24, seed=99):  # unseen starts
        tokens = list(example.tokens)
        out = forward(model, mx.array(tokens), chain_rows(len(tokens), np.arange(len(tokens))),
                      make_cache(4))
        guess = np.array(mx.argmax(logits(model, out.stream_hidden), axis=-1))  # (L, 3)
        for t in range(4, len(tokens)):  # a few tokens of context first
            count += 1
            for j in (1, 2, 3):
                for col, k in enumerate((j, j + 1, j + 2)):
                    hits[j - 1, col] += guess[t, j - 1] == _ahead(successor, tokens[t], k)
    accuracy = hits / count
    assert (accuracy[:, 1] > 0.8).all(), accuracy  # the right target
    assert (accuracy[:, [0, 2]] < 0.1).all(), accuracy  # shifted by one either way: wrong


def test_self_distilled_streams_speed_up_lossless_decoding(tmp_path, base_dir):
    """Streams trained on the base's own greedy output get accepted, output unchanged."""
    from mlx_lm.utils import load_tokenizer

    from specstream_mlx.train.distill import distill

    model = _model()
    prompts = [Example(tuple(random_prompt(8, seed)), 8) for seed in range(64)]
    examples = distill(model.base, load_tokenizer(base_dir), prompts, max_tokens=40,
                       batch_size=32)
    config = TrainConfig(iters=80, batch_size=8, max_seq_len=48, learning_rate=1e-2, warmup=5,
                         report_every=80, save_every=1000)
    train(model, examples, config, base_dir, tmp_path / "out")
    emitted = forwards = 0
    tree = TreeSettings((2, 1, 1), None)
    for seed in range(100, 105):  # prompts not seen in training
        prompt = random_prompt(8, seed)
        tokens, steps = decode_tokens(model, prompt, 40, tree=tree)
        assert tokens == reference_tokens(model.base, prompt, 40)
        emitted += sum(len(s.tokens) for s in steps[1:])
        forwards += len(steps) - 1
    assert emitted / forwards > 1.8


def _grads(model, weights):
    tokens = mx.array([random_prompt(24)])
    mask = mx.ones((1, 24), dtype=mx.bool_)
    step = nn.value_and_grad(model, lambda m, t, k: loss_fn(m, t, k, weights))
    (_, _), grads = step(model, tokens, mask)
    return dict(tree_flatten(grads))


def test_lossless_gradients_reach_only_stream_parameters():
    model = _model()
    make_trainable(model, TrainConfig())
    names = set(trainable_names(model))
    assert names == {"stream_embeddings", "prune_adapter.down.weight", "prune_adapter.up.weight",
                     *(f"stream_adapters.{i}.{p}.weight" for i in range(2) for p in ("down", "up"))}
    grads = _grads(model, LossWeights())
    assert set(grads) == names
    for name, g in grads.items():
        if not name.endswith("down.weight"):  # down gets no gradient while its up is zero
            assert mx.abs(g).max().item() > 0, name
    for adapter in [model.prune_adapter, *model.stream_adapters]:
        adapter.up.weight = 0.1 * mx.random.normal(adapter.up.weight.shape)
    for name, g in _grads(model, LossWeights()).items():
        assert mx.abs(g).max().item() > 0, name


def test_shared_mode_trains_lora_in_top_layers_only():
    model = _model(mode="shared", adapter_rank=0)
    make_trainable(model, TrainConfig(lora_rank=4))
    names = set(trainable_names(model))
    lora = {n for n in names if "lora" in n}
    assert lora and all(n.startswith(("base.model.layers.2.", "base.model.layers.3.")) for n in lora)
    grads = _grads(model, LossWeights(main=1.0))
    assert set(grads) == names
    assert all(mx.abs(grads[n]).max().item() > 0 for n in lora if n.endswith("lora_b"))


def test_training_forward_matches_inference_forward():
    model = _model()
    tokens = random_prompt(16, seed=9)
    main, streams, _ = train_forward(model, mx.array([tokens]))
    for t in (0, 7, 15):
        out = forward(model, mx.array(tokens[: t + 1]), chain_rows(t + 1, [t]), make_cache(4))
        np.testing.assert_allclose(np.array(streams[0, t]), np.array(out.stream_hidden[0]),
                                   atol=1e-4)
        np.testing.assert_allclose(np.array(main[0, t]), np.array(out.main_hidden[-1]), atol=1e-4)


def _train_interrupted(monkeypatch, model, examples, config, base_dir, out, at, **kwargs):
    """Train until the checkpoint of step ``at`` is written, then 'crash'."""
    import specstream_mlx.train.loop as trainer

    real_save = trainer.save_checkpoint

    def save_then_crash(model, optimizer, step, *args):
        real_save(model, optimizer, step, *args)
        if step == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(model, examples, config, base_dir, out, **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)


@pytest.mark.parametrize("embedding_lr", [None, 0.05])
def test_resume_continues_identically(tmp_path, base_dir, monkeypatch, embedding_lr):
    corpus = _successor_corpus(32)
    config = TrainConfig(iters=6, batch_size=4, max_seq_len=32, learning_rate=5e-3, warmup=2,
                         embedding_lr=embedding_lr, report_every=100, save_every=3)
    straight = _model()
    train(straight, corpus, config, base_dir, tmp_path / "a")
    _train_interrupted(monkeypatch, _model(), corpus, config, base_dir, tmp_path / "b", at=3)
    again = _model()
    train(again, corpus, config, base_dir, tmp_path / "b", resume=tmp_path / "b")
    for (name, x), (_, y) in zip(tree_flatten(straight.trainable_parameters()),
                                 tree_flatten(again.trainable_parameters())):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=name)
    assert json.loads((tmp_path / "b" / "training_state.json").read_text())["step"] == 6


def test_interrupted_save_keeps_last_checkpoint(tmp_path, base_dir, monkeypatch):
    import specstream_mlx.train.loop as trainer

    model = _model()
    config = TrainConfig(iters=4, batch_size=4, max_seq_len=32, report_every=100, save_every=2)
    real_save = trainer.save_checkpoint
    calls = []

    def flaky(model, optimizer, step, *args):
        calls.append(step)
        if step == 4:
            real = mx.save_safetensors
            monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(
                OSError("disk full")))
            try:
                return real_save(model, optimizer, step, *args)
            finally:
                monkeypatch.setattr(mx, "save_safetensors", real)
        return real_save(model, optimizer, step, *args)

    monkeypatch.setattr(trainer, "save_checkpoint", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(model, _successor_corpus(16), config, base_dir, tmp_path / "ck")
    state = json.loads((tmp_path / "ck" / "training_state.json").read_text())
    assert state["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_data_line_names_file_and_line(tmp_path, base_dir):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: expected"):
        load_examples(str(data), tokenizer)
    data.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"train.jsonl:2"):
        load_examples(str(data), tokenizer)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hello", "completion": " world"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    examples = load_examples(str(good), tokenizer)
    assert len(examples) == 2 and all(0 < e.loss_start < len(e.tokens) for e in examples)


def test_cli_train_resume_and_generate(tmp_path, base_dir):
    data = write_count_data(tmp_path / "data.jsonl")
    out = tmp_path / "trained"
    runner = CliRunner()
    args = tiny_train_args(base_dir, data, out) + ["--stream-layers", "2", "--adapter-rank", "4"]
    result = runner.invoke(app, args + ["--iters", "2"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, args + ["--iters", "2"])
    assert again.exit_code != 0 and "--resume" in again.output
    result = runner.invoke(app, args + ["--iters", "4", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_state.json").read_text())["step"] == 4
    result = runner.invoke(app, ["generate", "--model", str(out), "-p", "count 9", "-m", "8"])
    assert result.exit_code == 0, result.output


def test_first_target_tokens_cuts_the_shortest_prefix():
    examples = [Example((1, 2, 3, 4), 2), Example((5, 6, 7), 0), Example((8, 9), 1)]  # 2, 3, 1 targets
    assert first_target_tokens(examples, 2, max_seq_len=3) == examples[:2]  # 1 + 3 within 3 tokens
    assert first_target_tokens(examples, 1) == examples[:1]
    assert first_target_tokens(examples, 2) == examples[:1]
    assert first_target_tokens(examples, 3) == examples[:2]
    assert first_target_tokens(examples, 6) == examples
    with pytest.raises(DataError, match="holds 6 target tokens, fewer than --data-tokens 7"):
        first_target_tokens(examples, 7)
    with pytest.raises(DataError, match="positive"):
        first_target_tokens(examples, 0)


def test_cli_data_tokens_and_cache_dtype(tmp_path, base_dir, monkeypatch):
    data = write_count_data(tmp_path / "data.jsonl")
    out = tmp_path / "trained"
    runner = CliRunner()
    args = tiny_train_args(base_dir, data, out) + ["--stream-layers", "2", "--adapter-rank", "4"]
    result = runner.invoke(app, args + ["--iters", "2", "--data-tokens", "10"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_state.json").read_text())["data_tokens"] == 10
    result = runner.invoke(app, args + ["--iters", "4", "--resume"])
    assert result.exit_code == 2 and "--data-tokens 10" in result.output, result.output
    result = runner.invoke(app, args + ["--iters", "4", "--resume", "--data-tokens", "10"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, tiny_train_args(base_dir, data, tmp_path / "big")
                           + ["--iters", "2", "--data-tokens", "100000"])
    assert result.exit_code != 0 and "fewer than --data-tokens 100000" in result.output
    assert not (tmp_path / "big").exists()
    result = runner.invoke(app, tiny_train_args(base_dir, data, tmp_path / "d")
                           + ["--iters", "2", "--data-tokens", "10", "--distill"])
    assert result.exit_code == 2 and "--distill" in result.output
    from specstream_mlx.train import cached

    asked = []
    monkeypatch.setattr(cached, "precompute",
                        lambda m, e, dtype=None, _f=cached.precompute, **kw: asked.append(dtype) or _f(m, e, dtype, **kw))
    result = runner.invoke(app, tiny_train_args(base_dir, data, tmp_path / "half")
                           + ["--iters", "2", "--cache-dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert asked == [mx.float16]
    result = runner.invoke(app, tiny_train_args(base_dir, data, tmp_path / "int8")
                           + ["--iters", "2", "--cache-dtype", "int8"])
    assert result.exit_code != 0 and "cache_dtype must be one of float32, float16" in result.output
    result = runner.invoke(app, tiny_train_args(base_dir, data, tmp_path / "uncached")
                           + ["--iters", "2", "--cache-dtype", "float16", "--no-cached"])
    assert result.exit_code == 2 and "lossless mode only" in result.output


def test_cli_train_fresh_streams_over_a_checkpoint(tmp_path, base_dir):
    data = write_count_data(tmp_path / "data.jsonl")
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    result = runner.invoke(app, ["init", "--model", str(base_dir), "--out", str(ckpt), "--stream-layers", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "trained"
    args = ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--adapter-rank", "4", "--batch-size", "2", "--max-seq-len", "32", "--save-every", "2",
            "--warmup", "1"]
    # The checkpoint's own streams have no adapters: a silent mismatch would train without them.
    for bad, says in ((["--positions", "0"], "--positions must be at least 1"),
                      (["--embedding-lr", "0"], "--embedding-lr must be positive"),
                      (["--positions", "4", "--mode", "shared", "--fresh-streams"],
                       "--positions works with cached training")):
        result = runner.invoke(app, args + ["--iters", "2"] + bad)
        assert result.exit_code != 0 and says in result.output, result.output
        assert not out.exists()
    refused = runner.invoke(app, args + ["--iters", "2"])
    assert refused.exit_code != 0 and "--fresh-streams" in refused.output
    assert "--adapter-rank 4 (it has 0)" in refused.output
    result = runner.invoke(app, args + ["--iters", "2", "--fresh-streams"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "specstream.json").read_text())["stream_adapter_rank"] == 4
    result = runner.invoke(app, args + ["--iters", "4", "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_state.json").read_text())["step"] == 4
    assert json.loads((out / "specstream.json").read_text())["stream_adapter_rank"] == 4


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_cached_stream_rows_match_training_forward(family):
    from specstream_mlx.train.cached import precompute, stream_hidden

    model = _model(family=family)
    tokens = random_prompt(30, seed=3)  # longer than Gemma 3's window (8)
    main = precompute(model, [Example(tuple(tokens), 12)])[0]
    positions, hidden = stream_hidden(model, main)
    assert positions[0] == 12 - 1 - 3 and positions[-1] == 28
    _, streams, _ = train_forward(model, mx.array([tokens]))
    np.testing.assert_allclose(np.array(hidden), np.array(streams[0, mx.array(positions)]),
                               atol=1e-5)
    # A random subset of positions gives those positions' rows unchanged.
    some, sampled = stream_hidden(model, main, np.random.default_rng(0).random(6))
    assert 0 < some.size <= 6 and set(some) <= set(positions)
    np.testing.assert_allclose(np.array(sampled), np.array(streams[0, mx.array(some)]), atol=1e-5)


def test_cached_main_stream_keeps_loss_rows_only_and_can_be_stored_half_size(monkeypatch):
    from specstream_mlx.train import cached

    model = _model()
    tokens = random_prompt(30, seed=3)
    examples = [Example(tuple(tokens), 12), Example(tuple(tokens[:9]), 2)]
    full = cached.precompute(model, examples)
    assert [m.hidden_start for m in full] == [12 - 1 - 3, 0]  # gamma 3: row 8 streams to token 12
    assert full[0].hidden.shape[0] == 30 - 8 and full[1].hidden.shape[0] == 9
    stored = sum(a.nbytes for m in full for a in [m.hidden, *m.keys, *m.values])
    assert cached.main_stream_bytes(model, examples) == stored
    # Rows kept are the full forward's rows, at their absolute positions (streams, early exit).
    whole = cached.precompute(model, [Example(tuple(tokens), 0)])[0]
    at = np.arange(8, 29)
    np.testing.assert_allclose(np.array(full[0].rows(at)), np.array(whole.rows(at)), atol=1e-5)
    # What stays allocated is the compact arrays, not the slices' parent buffers.
    import gc

    del full, whole
    gc.collect()
    before = mx.get_active_memory()
    full = cached.precompute(model, examples)
    gc.collect()
    held = mx.get_active_memory() - before
    assert stored <= held < stored * 1.25 + 4096, (held, stored)
    half = cached.precompute(model, examples, mx.float16)
    assert all(a.dtype == mx.float16 for m in half for a in [m.hidden, *m.keys, *m.values])
    assert cached.main_stream_bytes(model, examples, mx.float16) * 2 == stored
    _, want = cached.stream_hidden(model, full[0])
    _, got = cached.stream_hidden(model, half[0])
    assert got.dtype == mx.float32
    err = float(mx.abs(got - want).max())
    assert 0 < err < 5e-2 * float(mx.abs(want).max())  # rounded once, computed in float32
    monkeypatch.setattr(cached, "_memory_bytes", lambda: stored)  # a machine too small for it
    with pytest.raises(ValueError, match="--cache-dtype float16"):
        cached.precompute(model, examples)


def test_cached_main_stream_shards_are_reused_and_survive_an_interruption(tmp_path, monkeypatch):
    from specstream_mlx.train import cached

    model = _model()
    examples = [Example(tuple(random_prompt(12 + i, seed=i)), 4) for i in range(3)]
    want = cached.precompute(model, examples)
    calls = []
    real = cached.lower_forward

    def counted(m, tokens):
        calls.append(tokens.shape[1])
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt
        return real(m, tokens)

    monkeypatch.setattr(cached, "lower_forward", counted)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):  # killed on the third example: two shards of one kept
        cached.precompute(model, examples, folder=tmp_path, flush_every=1)
    assert len(list(tmp_path.glob("*/main-*.safetensors"))) == 2
    interrupt, calls[:] = False, []
    got = cached.precompute(model, examples, folder=tmp_path, flush_every=1)
    assert calls == [14]  # only the example the interrupted run lacked
    for a, b in zip(want, got):
        assert a.hidden_start == b.hidden_start
        for x, y in zip([a.hidden, *a.keys, *a.values], [b.hidden, *b.keys, *b.values]):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-6)
    calls[:] = []
    cached.precompute(model, examples + [Example(examples[0].tokens, 5)], folder=tmp_path)
    assert calls == [12]  # another loss_start is another entry
    cached.precompute(model, examples, mx.float16, folder=tmp_path)
    assert len(calls) == 4  # another stored type, another folder
    assert len(list(tmp_path.iterdir())) == 2


def test_cached_training_learns_and_resumes(tmp_path, base_dir, monkeypatch):
    from mlx_lm.utils import load_tokenizer

    from specstream_mlx.train.distill import distill

    model = _model()
    prompts = [Example(tuple(random_prompt(8, seed)), 8) for seed in range(48)]
    examples = distill(model.base, load_tokenizer(base_dir), prompts, max_tokens=32)
    config = TrainConfig(iters=60, batch_size=8, max_seq_len=48, learning_rate=1e-2, warmup=5,
                         report_every=60, save_every=30)
    figures = train(model, examples, config, base_dir, tmp_path / "a", cached=True)
    assert figures["stream_1_acc"] > 0.5, figures
    emitted = forwards = 0
    for seed in range(100, 104):
        prompt = random_prompt(8, seed)
        tokens, steps = decode_tokens(model, prompt, 32, tree=TreeSettings((2, 1, 1), None))
        assert tokens == reference_tokens(model.base, prompt, 32)
        emitted += sum(len(s.tokens) for s in steps[1:])
        forwards += len(steps) - 1
    assert emitted / forwards > 1.5
    # Resuming the step-30 checkpoint reproduces the uninterrupted run exactly.
    _train_interrupted(monkeypatch, _model(), examples, config, base_dir, tmp_path / "b", at=30,
                       cached=True)
    resumed = _model()
    train(resumed, examples, config, base_dir, tmp_path / "b", resume=tmp_path / "b", cached=True)
    for (name, x), (_, y) in zip(tree_flatten(model.trainable_parameters()),
                                 tree_flatten(resumed.trainable_parameters())):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=name)


def test_embedding_lr_applies_to_the_stream_table_only(tmp_path, base_dir):
    # Adam's first step moves each weight by a fixed multiple of its learning rate
    # (sqrt(1 - b2) / (1 - b1) ~ 3.2 without bias correction).
    model = _model()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    config = TrainConfig(iters=1, batch_size=4, max_seq_len=32, learning_rate=1e-6,
                         embedding_lr=0.1, warmup=0, schedule="constant", report_every=100,
                         save_every=100)
    train(model, _successor_corpus(8), config, base_dir, tmp_path / "out")
    after = dict(tree_flatten(model.parameters()))
    table = np.abs(np.array(after["stream_embeddings"]) - before["stream_embeddings"])
    adapter = np.abs(np.array(after["stream_adapters.0.up.weight"])
                     - before["stream_adapters.0.up.weight"])
    assert 0.1 < table.max() < 0.4
    assert 0 < adapter.max() < 4e-6


def test_adapters_act_relative_to_their_rows_scale():
    # h -> h + rms(h) * f(h / rms(h)) is homogeneous: scaling a row scales its output,
    # so the same weights matter as much on a residual stream of RMS 20 as of RMS 1.
    from specstream_mlx.model import ResidualAdapter

    mx.random.seed(0)
    adapter = ResidualAdapter(64, 8)
    adapter.up.weight = mx.random.normal(adapter.up.weight.shape) * 0.1
    h = mx.random.normal((5, 64))
    small, large = adapter(h), adapter(h * 300.0)
    np.testing.assert_allclose(np.array(large), 300.0 * np.array(small), rtol=1e-4, atol=1e-3)
    assert float(mx.abs(small - h).max()) > 0.05


def test_distillation_cache_is_reused_and_checked(tmp_path):
    from mlx_lm.utils import load_tokenizer

    from specstream_mlx.train.distill import distill

    base_dir = write_base(tmp_path / "base", "llama")
    model, tokenizer = _model(), load_tokenizer(base_dir)
    prompts = [Example(tuple(random_prompt(6, seed)), 6) for seed in range(3)]
    cache = tmp_path / "cache.jsonl"
    first = distill(model.base, tokenizer, prompts, max_tokens=4, cache_file=cache)
    # A shorter data set reuses the cache's head; nothing is generated again.
    again = distill(None, tokenizer, prompts[:2], max_tokens=4, cache_file=cache)
    assert again == first[:2]
    # A run killed mid-append leaves a partial last line: it is dropped and redone.
    cache.write_text("".join(f"{line}\n" for line in cache.read_text().splitlines()[:2])
                     + '{"tokens": [1, 2')
    assert distill(model.base, tokenizer, prompts, max_tokens=4, cache_file=cache) == first
    assert len(cache.read_text().splitlines()) == 3
    other = [Example(tuple(random_prompt(6, 99)), 6)]
    with pytest.raises(ValueError, match="cache.jsonl:1 holds another prompt"):
        distill(model.base, tokenizer, other, max_tokens=4, cache_file=cache)


def _shared_batch(model):
    """A shared-mode model with non-zero LoRA and a padded batch of three examples."""
    make_trainable(model, TrainConfig(lora_rank=4))
    for name, module in model.base.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(3)) * 0.05
    examples = [Example(tuple(random_prompt(n, seed=n)), 4) for n in (20, 13, 17)]
    tokens, mask = collate(examples, [0, 1, 2], 32)
    return examples, mx.array(tokens), mask


def test_cached_lower_layers_give_the_same_shared_loss_and_gradients():
    from specstream_mlx.train.cached import LowerCache

    model = _model(mode="shared", adapter_rank=4)
    examples, tokens, mask = _shared_batch(model)
    weights = LossWeights(main=1.0, stream=0.1, early_exit=0.1)
    cache = LowerCache(model, examples)
    first = cache.batch([0, 2], tokens.shape[1])  # computes 0 and 2 together (padded)
    lower = cache.batch([0, 1, 2], tokens.shape[1])  # 1 now; 0 and 2 from the cache
    assert mx.array_equal(first[1], lower[2]).item()
    step = nn.value_and_grad(model, lambda m, low: loss_fn(m, tokens, mask, weights, low)[0])
    full_loss, full_grads = step(model, None)
    cached_loss, cached_grads = step(model, lower)
    np.testing.assert_allclose(cached_loss.item(), full_loss.item(), rtol=1e-5)
    full, cached = dict(tree_flatten(full_grads)), dict(tree_flatten(cached_grads))
    assert set(full) == set(cached) and any("lora" in k for k in full)
    for name in full:
        np.testing.assert_allclose(np.array(cached[name]), np.array(full[name]), atol=1e-5,
                                   rtol=1e-3, err_msg=name)


def test_stream_weight_zero_is_a_plain_lora_fine_tune():
    """Main rows never see streams: the main loss is the same with or without stream rows."""
    model = _model(mode="shared", adapter_rank=4)
    _, tokens, mask = _shared_batch(model)
    main, streams, _ = train_forward(model, tokens, with_streams=False)
    assert streams is None
    with_streams, metrics = loss_fn(model, tokens, mask, LossWeights(main=1.0, stream=0.1))
    plain, plain_metrics = loss_fn(model, tokens, mask, LossWeights(main=1.0, stream=0.0))
    assert "stream_1_loss" in metrics and "stream_1_loss" not in plain_metrics
    np.testing.assert_allclose(plain_metrics["main_loss"].item(), metrics["main_loss"].item(),
                               rtol=1e-5)
    assert with_streams.item() > plain.item()


def test_shared_cached_training_learns_and_resumes(tmp_path, base_dir, monkeypatch):
    """Shared mode with the lower layers cached: the main loss falls; resume is exact."""
    examples = [Example(ex.tokens, 8) for ex in _successor_corpus(n=32, length=24)]
    config = TrainConfig(iters=20, batch_size=8, max_seq_len=24, learning_rate=5e-3, warmup=2,
                         report_every=20, save_every=10, lora_rank=4,
                         weights=LossWeights(main=1.0, stream=0.1, early_exit=0.1))
    model = _model(mode="shared", adapter_rank=0)
    tokens, mask = collate(examples, range(8), 24)
    _, before = loss_fn(model, mx.array(tokens), mask, config.weights)
    figures = train(model, examples, config, base_dir, tmp_path / "a", cached=True)
    assert figures["main_loss"] < 0.7 * before["main_loss"].item(), (figures, before)
    _train_interrupted(monkeypatch, _model(mode="shared", adapter_rank=0), examples, config,
                       base_dir, tmp_path / "b", at=10, cached=True)
    resumed = _model(mode="shared", adapter_rank=0)
    train(resumed, examples, config, base_dir, tmp_path / "b", resume=tmp_path / "b", cached=True)
    for (name, x), (_, y) in zip(tree_flatten(model.trainable_parameters()),
                                 tree_flatten(resumed.trainable_parameters())):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=name)


def test_stream_rows_from_a_position_on_equal_the_full_forward():
    """Positions before the first target get no stream rows; the others are unchanged."""
    model = _model(mode="shared", adapter_rank=4)
    tokens = mx.array([random_prompt(20, seed=1), random_prompt(20, seed=2)])
    main, streams, _ = train_forward(model, tokens)
    main_cut, streams_cut, _ = train_forward(model, tokens, stream_from=7)
    assert streams_cut.shape[1] == 13
    np.testing.assert_allclose(np.array(streams_cut), np.array(streams[:, 7:]), atol=1e-4)
    np.testing.assert_allclose(np.array(main_cut), np.array(main), atol=1e-4)


def test_trimmed_stream_losses_equal_the_untrimmed_computation():
    """Stream j at row t scores token t + 1 + j; trimming the early rows changes no term."""
    from specstream_mlx.families import lm_head

    model = _model(mode="shared", adapter_rank=4)
    examples = [Example(tuple(random_prompt(20, seed=s)), start) for s, start in ((1, 12), (2, 14))]
    tokens, mask = collate(examples, [0, 1], 32)
    _, metrics = loss_fn(model, mx.array(tokens), mask, LossWeights(main=1.0, stream=0.1))
    _, streams, _ = train_forward(model, mx.array(tokens))  # every row, no trimming
    for j in (1, 2, 3):
        rows = [(b, t) for b in range(2) for t in range(20 - 1 - j) if mask[b, t + 1 + j]]
        hidden = mx.stack([streams[b, t, j - 1] for b, t in rows])
        targets = mx.array([int(tokens[b, t + 1 + j]) for b, t in rows])
        want = nn.losses.cross_entropy(lm_head(model.base, hidden), targets).mean()
        np.testing.assert_allclose(metrics[f"stream_{j}_loss"].item(), want.item(), rtol=1e-4)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, base_dir):
    """A token-id corpus made for another model fails before any step, with a clear message."""
    model = _model()
    config = TrainConfig(iters=1, batch_size=1, max_seq_len=8, report_every=10, save_every=10)
    with pytest.raises(ValueError, match=f"token id {VOCAB}, beyond the model's vocabulary"):
        train(model, [Example((1, 2, VOCAB), 1)], config, base_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lower_cache_files_are_reused_by_the_same_model_only(tmp_path, monkeypatch):
    """Flushed states come back for the same base and examples; another base computes its own."""
    import specstream_mlx.train.cached as cached

    model = _model(mode="shared", adapter_rank=0)
    examples = [Example(tuple(random_prompt(n, seed=n)), 2) for n in (9, 12, 7)]
    first = cached.LowerCache(model, examples, folder=tmp_path)
    want = first.batch([0, 1, 2], 12)
    first.flush()
    assert len(list(tmp_path.rglob("lower-*.safetensors"))) == 1
    calls = []
    real = cached.lower_forward
    monkeypatch.setattr(cached, "lower_forward", lambda *a: calls.append(1) or real(*a))
    again = cached.LowerCache(model, examples[::-1], folder=tmp_path)  # other order: keyed by tokens
    assert mx.array_equal(again.batch([2, 1, 0], 12), want).item() and calls == []
    other = _model(mode="shared", adapter_rank=0)
    other.base.model.embed_tokens.weight = other.base.model.embed_tokens.weight + 1.0
    cached.LowerCache(other, examples, folder=tmp_path).batch([0], 12)
    assert calls == [1]


def test_length_grouped_batches_cover_each_epoch_and_cut_padding():
    from specstream_mlx.train.data import batch_indices

    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 400, size=203)
    per_epoch = 203 // 8
    for grouped in (None, lengths):
        order = batch_indices(203, 8, seed=5, lengths=grouped, window=4)
        epochs = [[next(order) for _ in range(per_epoch)] for _ in range(2)]
        for batches in epochs:  # each example at most once per epoch, all but the remainder seen
            seen = np.concatenate(batches)
            assert len(set(seen.tolist())) == len(seen) == per_epoch * 8
        assert not all((a == b).all() for a, b in zip(*epochs))  # epochs differ
    padded = lambda batches: sum(lengths[b].max() * len(b) for b in batches) / sum(lengths[b].sum() for b in batches)
    plain = [next(batch_indices(203, 8, 5, k)) for k in range(per_epoch)]
    grouped = [next(batch_indices(203, 8, 5, k, lengths=lengths, window=4)) for k in range(per_epoch)]
    assert padded(grouped) < 1.3 < 1.5 < padded(plain)  # measured: 1.21 and 1.6-1.7
    # the batch of step k does not depend on where the iterator started (exact resume)
    late = batch_indices(203, 8, 5, start_step=per_epoch + 3, lengths=lengths, window=4)
    early = batch_indices(203, 8, 5, lengths=lengths, window=4)
    for _ in range(per_epoch + 3):
        next(early)
    assert (next(late) == next(early)).all()
    # without lengths, the batches are the permutation's slices, as before grouping existed
    perm = np.random.default_rng(5).permutation(203)
    assert (next(batch_indices(203, 8, 5, 1)) == perm[8:16]).all()
