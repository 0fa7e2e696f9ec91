"""Tiny random Hugging Face (transformers) models of each supported family, built in the tests."""

from __future__ import annotations

from pathlib import Path

from .helpers import VOCAB, write_tokenizer

BASE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
            max_position_embeddings=2048, bos_token_id=256, eos_token_id=257, pad_token_id=None)

HF_CONFIGS = {
    "llama": dict(BASE, model_type="llama", tie_word_embeddings=True, rope_theta=500.0),
    "mistral": dict(BASE, model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=False, rope_theta=1e4),
    "qwen3": dict(BASE, model_type="qwen3", tie_word_embeddings=True, head_dim=16),
    "phi3": dict(BASE, model_type="phi3", tie_word_embeddings=False),
    # mlx-lm's gemma computes the exact GELU whatever the config says: use that one.
    "gemma": dict(BASE, model_type="gemma", head_dim=16, tie_word_embeddings=True),
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"] * 2,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}
HF_FAMILIES = list(HF_CONFIGS)


def hf_model(family: str, seed: int = 0):
    """A random transformers causal LM of ``family`` (float32, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(HF_CONFIGS[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if family == "gemma":  # mlx-lm's gemma computes the exact GELU whatever the config says
        config.hidden_act = "gelu"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(0.0 if gemma else 1.0)
            else:  # peaked logits make greedy decoding well defined
                p.copy_(torch.randn_like(p) * 0.08)
    return model


def save_hf(model, path: Path, fmt: str = "safetensors") -> Path:
    """Save a transformers model folder with the test tokenizer.

    fmt: ``safetensors`` (one file), ``sharded`` (several files + index) or ``bin``.
    """
    import torch

    path.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        model.config.save_pretrained(path)
        state = {k: v for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, max_shard_size="40KB" if fmt == "sharded" else "5GB")
    write_tokenizer(path)
    return path


def hf_logits(model, tokens):
    """Logits of a token sequence from the transformers model. ``(L,) -> (L, V)``."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_greedy(model, tokens, max_tokens: int) -> list:
    """Greedy continuation by transformers' own generate()."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(tokens):].tolist()
