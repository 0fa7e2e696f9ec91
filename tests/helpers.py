"""Tiny random models and a byte-level tokenizer, built in the tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

VOCAB = 272  # 256 bytes + specials + spare ids

BASE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            vocab_size=VOCAB, max_position_embeddings=2048)

CONFIGS = {
    "llama": dict(BASE, model_type="llama", tie_word_embeddings=True),
    "mistral": dict(BASE, model_type="mistral", tie_word_embeddings=False),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(BASE, model_type="qwen3", tie_word_embeddings=True, head_dim=16,
                  rope_theta=1e6),
    "phi3": dict(BASE, model_type="phi3", tie_word_embeddings=False),
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, sliding_window_pattern=2, rope_local_base_freq=1e4,
                        rope_theta=1e6, rope_scaling=None),
}
FAMILIES = ["llama", "qwen2", "phi3", "gemma3_text", "qwen3", "mistral"]

# Kernel test models: head dim 64 (a size the fused kernels serve; the models above
# have head dim 16, which they refuse) and 2 query heads per kv head. On a Mac or a
# CUDA GPU, the tree calls of these models take the real fused kernel.
KERNEL_SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
for _family in ("llama", "qwen2", "gemma3_text"):
    _extra = {"head_dim": 64, "query_pre_attn_scalar": 64} if "head_dim" in CONFIGS[_family] else {}
    CONFIGS[f"{_family}-d64"] = dict(CONFIGS[_family], **KERNEL_SHAPE, **_extra)


def base_model(family: str, seed: int = 0):
    """A random mlx-lm model of ``family`` (float32)."""
    from mlx_lm.utils import _get_classes

    config = dict(CONFIGS[family])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    # Re-draw every weight so different seeds give different models; scale up
    # so the logits are peaked enough to make greedy decoding well defined.
    params = tree_map(lambda p: mx.random.normal(p.shape) * 0.08, model.parameters())
    model.update(params)
    for layer in model.model.layers:  # norms at 1 (Gemma's at 0: it adds 1)
        for name, child in layer.children().items():
            if "norm" in name and hasattr(child, "weight"):
                child.weight = mx.zeros_like(child.weight) if "gemma" in family else mx.ones_like(child.weight)
    mx.eval(model.parameters())
    return model, config


def write_tokenizer(path: Path, chat_template: bool = True) -> None:
    """A byte-level BPE tokenizer with no merges: one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    for extra in range(258, VOCAB):  # one token per model id, so every id decodes
        vocab[f"<x{extra}>"] = extra
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        config["chat_template"] = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_base(path: Path, family: str, seed: int = 0) -> Path:
    """Save a random mlx-lm model directory (config, weights, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    model, config = base_model(family, seed)
    config = dict(config, eos_token_id=257, bos_token_id=256)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    write_tokenizer(path)
    return path


def write_count_data(path: Path) -> Path:
    """A tiny prompt/completion JSONL (8 records) for CLI training tests."""
    path.write_text("".join(json.dumps({"prompt": f"count {i}", "completion": " 1 2 3 4 5"}) + "\n"
                            for i in range(8)))
    return path


def tiny_train_args(base_dir: Path, data: Path, out: Path) -> list:
    """``specstream-mlx train`` arguments shared by the CLI training tests (add the rest)."""
    return ["train", "--model", str(base_dir), "--data", str(data), "--out", str(out),
            "--batch-size", "2", "--max-seq-len", "32", "--save-every", "2", "--warmup", "1"]


def reference_tokens(base, prompt, max_tokens: int) -> list:
    """Greedy tokens from mlx-lm's own decoding loop."""
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), base, max_tokens=max_tokens):
        out.append(int(token))
    return out


def random_prompt(length: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, 256, size=length)]


def ss_model(family: str, gamma: int = 3, stream_layers: int = 2, mode: str = "lossless",
             seed: int = 0, adapter_rank: int = 0, stream_lora_rank: int = 0):
    """A ``SpecStreamModel`` over a random base with random (untrained) streams."""
    from specstream_mlx.config import SpecStreamConfig
    from specstream_mlx.families import family_for
    from specstream_mlx.model import SpecStreamModel

    base, config = base_model(family, seed)
    spec = SpecStreamConfig(
        gamma=gamma, stream_layers=stream_layers, mode=mode,
        hidden_size=config["hidden_size"], vocab_size=VOCAB,
        num_layers=config["num_hidden_layers"], stream_adapter_rank=adapter_rank,
        stream_lora_rank=stream_lora_rank,
    )
    model = SpecStreamModel(base, spec, family_for(config["model_type"]))
    mx.random.seed(seed + 1)
    hidden = config["hidden_size"]
    model.stream_embeddings = mx.random.normal((gamma, hidden)) * 0.5
    model.prune_adapter.down.weight = mx.random.normal((8, hidden)) * hidden**-0.5
    model.prune_adapter.up.weight = mx.random.normal((hidden, 8)) * 0.05
    for adapter in model.stream_adapters:
        adapter.down.weight = mx.random.normal(adapter.down.weight.shape) * hidden**-0.5
        adapter.up.weight = mx.random.normal(adapter.up.weight.shape) * 0.2
    for lora in model.stream_lora:  # non-zero on both sides, so the updates change the streams
        for path in lora.paths:
            pair = lora.pair(path)
            pair["a"] = mx.random.normal(pair["a"].shape) * pair["a"].shape[0] ** -0.5
            pair["b"] = mx.random.normal(pair["b"].shape) * 0.1
    mx.eval(model.parameters())
    return model


def decode_tokens(model, prompt, max_tokens, tree=None, speculative=True, drafter=None,
                  **kwargs) -> tuple:
    """Tokens from ``decode`` truncated to ``max_tokens``, plus the steps.

    ``tree`` / ``speculative`` choose the drafter through ``make_drafter``
    (unless ``drafter`` is given); other keywords go to ``decode``.
    """
    from specstream_mlx.decode import decode
    from specstream_mlx.drafters import make_drafter

    if drafter is None:
        drafter = make_drafter(model, tree, speculative=speculative)
    steps = list(decode(model, prompt, max_tokens, drafter=drafter, **kwargs))
    tokens = [t for s in steps for t in s.tokens][:max_tokens]
    return tokens, steps


def write_own_continuations(base, path: Path, count: int = 48, prompt_len: int = 6, tokens: int = 32) -> Path:
    """``tokens`` records of ``base``'s own greedy continuations of random prompts (seeds
    100..): what a lossless draft head learns from (self-distillation)."""
    with Path(path).open("w") as f:
        for i in range(count):
            prompt = random_prompt(prompt_len, seed=100 + i)
            f.write(json.dumps({"tokens": prompt + reference_tokens(base, prompt, tokens),
                                "loss_start": len(prompt)}) + "\n")
    return Path(path)


def checkpoint_with_own_data(tmp_path: Path) -> tuple:
    """A fresh tiny llama checkpoint (``init``, 2 stream layers) and a file of its base's
    own greedy continuations: ``(checkpoint dir, data file)``, for draft-head training tests."""
    from typer.testing import CliRunner

    from specstream_mlx.cli import app
    from specstream_mlx.loading import load

    base = write_base(Path(tmp_path) / "base", "llama")
    ckpt = Path(tmp_path) / "ckpt"
    result = CliRunner().invoke(app, ["init", "--model", str(base), "--out", str(ckpt), "--stream-layers", "2"])
    assert result.exit_code == 0, result.output
    plain, _ = load(str(ckpt))
    return ckpt, write_own_continuations(plain.base, Path(tmp_path) / "data.jsonl")
