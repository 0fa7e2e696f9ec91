"""Tiny llama.cpp GGUF files written in the tests with the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .helpers import VOCAB

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# GGUF tensor type of each weight kind in the test file (norms stay F32).
TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
         "attn_output": "F16", "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "F32",
         "output": "Q8_0"}
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
       "ffn_norm": "post_attention_layernorm"}


def byte_tokens() -> list:
    """The test tokenizer's vocabulary (helpers.write_tokenizer), padded to VOCAB."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<s>", "</s>", "Ġa"]
    return tokens + [f"<unused{i}>" for i in range(VOCAB - len(tokens))]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written from its definition: per head, (2, D/2) -> (D/2, 2)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def round_trip(w: np.ndarray, type_name: str) -> np.ndarray:
    """``w`` as a GGUF reader sees it after writing it as ``type_name`` (float32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return w.astype(np.float32)
    if type_name == "F16":
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qtype), qtype)


def write_llama_gguf(path: Path, hf_state: dict, config, types=TYPES, arch="llama") -> dict:
    """Write a transformers llama ``hf_state`` as a GGUF file, like llama.cpp's converter.

    Returns:
        The state dict the file encodes (quantization round trips applied), by HF name.
    """
    import gguf

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", float(config.rope_parameters["rope_theta"]))
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    tokens = byte_tokens()
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type",
                     [1] * 256 + [3, 3, 1] + [5] * (len(tokens) - 259))
    writer.add_array("tokenizer.ggml.merges", ["Ġ a"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 256)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 257)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    encoded = {}

    def add(gguf_name, hf_name, kind, permute_heads=None):
        w = hf_state[hf_name].float().numpy()
        type_name = types.get(kind, "F32") if w.ndim == 2 else "F32"
        stored = llama_cpp_permute(w, permute_heads) if permute_heads else w
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name in ("F32", "F16"):
            data = stored.astype(np.float16 if type_name == "F16" else np.float32)
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored.astype(np.float32), qtype),
                              raw_dtype=qtype)
        encoded[hf_name] = round_trip(w, type_name)

    add("token_embd.weight", "model.embed_tokens.weight", "token_embd")
    add("output_norm.weight", "model.norm.weight", "norm")
    if "lm_head.weight" in hf_state and not config.tie_word_embeddings:
        add("output.weight", "lm_head.weight", "output")
    for i in range(config.num_hidden_layers):
        for kind, hf in _HF.items():
            permute = {"attn_q": heads, "attn_k": kv_heads}.get(kind) if arch == "llama" else None
            add(f"blk.{i}.{kind}.weight", f"model.layers.{i}.{hf}.weight", kind, permute)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded
