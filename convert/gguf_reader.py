"""Read a llama.cpp GGUF file as Hugging Face-named MLX tensors plus a config.

Tensors come from ``mx.load(path, return_metadata=True)``: Q4_0, Q4_1 and Q8_0
arrive as MLX affine-quantized weights (``weight`` uint32, ``scales``,
``biases``; group size 32) and are kept that way; F32/F16 stay as they are;
BF16 is read from the file directly. ``mx.load`` silently turns any other type
into float16, so the tensor types are first read from the file header, and any
other type is refused by name. llama.cpp permutes the q/k projection rows of
Llama-style models for its RoPE layout; this is undone (on the packed rows, no
dequantisation).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import numpy as np

from .common import ConversionError

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF value types: fixed sizes (struct codes); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # MLX order (GGUF stores dims reversed)
    type_name: str
    offset: int  # from the start of the data section


class _Header:
    """A forward-only reader over the GGUF header bytes."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        if self.pos + size > len(self.buf):
            raise ConversionError("the GGUF header is truncated")
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            inner, count = self.unpack("I"), self.unpack("Q")
            if inner in _SCALARS:
                self.pos += count * struct.calcsize("<" + _SCALARS[inner])
            else:
                for _ in range(count):
                    self.skip_value(inner)
            return None
        raise ConversionError(f"the GGUF header has an unknown value type {vtype}")


def read_tensor_infos(path: Path) -> Tuple[List[TensorInfo], int]:
    """Tensor names, shapes and types from a GGUF header, and the data section offset.

    Raises:
        ConversionError: not a GGUF file, an unsupported version, a truncated header.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file (no GGUF magic)")
        head = _Header(buf)
        head.pos = 4
        version = head.unpack("I")
        if version < 2:
            raise ConversionError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
        n_tensors, n_kv = head.unpack("Q"), head.unpack("Q")
        alignment = 32
        for _ in range(n_kv):
            key = head.string()
            value = head.skip_value(head.unpack("I"))
            if key == "general.alignment":
                alignment = int(value)
        infos = []
        for _ in range(n_tensors):
            name = head.string()
            dims = [head.unpack("Q") for _ in range(head.unpack("I"))]
            type_id, offset = head.unpack("I"), head.unpack("Q")
            infos.append(TensorInfo(name, tuple(reversed(dims)), GGML_TYPES.get(type_id, f"type {type_id}"), offset))
        data_start = -(-head.pos // alignment) * alignment
    return infos, data_start


def _value(meta: dict, key: str, default=None):
    if key not in meta:
        return default
    value = meta[key]
    if isinstance(value, mx.array):
        return value.item() if value.size == 1 else value.tolist()
    return value


def gguf_config(meta: dict, has_output: bool) -> dict:
    """The mlx-lm config of a GGUF model from its metadata.

    Raises:
        ConversionError: an architecture other than llama, qwen2, qwen3; unsupported RoPE scaling.
    """
    arch = _value(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)}); "
            f"convert the Hugging Face checkpoint with --hf-path instead"
        )

    def get(key, default=None):
        return _value(meta, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConversionError(f"GGUF RoPE scaling {scaling!r} is not supported yet")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": not has_output,
    }
    for name in ("bos", "eos"):
        value = _value(meta, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{name}_token_id"] = int(value)
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias|scales|biases)$")


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    match = _NAME.match(name)
    if match is None:
        raise ConversionError(f"unexpected GGUF tensor {name!r}")
    layer, part, kind = match.groups()
    table = _LAYER_NAMES if layer is not None else _TOP_NAMES
    if part not in table:
        raise ConversionError(f"GGUF tensor {name!r} has no counterpart in the supported models")
    prefix = f"model.layers.{layer}." if layer is not None else ""
    return f"{prefix}{table[part]}.{kind}"


def unpermute_rows(array: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order: per head, rows ``(D/2, 2) -> (2, D/2)``. ``(R, ...) -> (R, ...)``."""
    rows = array.shape[0]
    rest = array.shape[1:]
    grouped = array.reshape(heads, rows // heads // 2, 2, *rest)
    return mx.swapaxes(grouped, 1, 2).reshape(rows, *rest)


def _read_bf16(path: Path, info: TensorInfo, data_start: int) -> mx.array:
    count = int(np.prod(info.shape))
    raw = np.fromfile(path, dtype=np.uint16, count=count, offset=data_start + info.offset)
    return mx.array(raw.reshape(info.shape)).view(mx.bfloat16)


def read_gguf(path: Path) -> Tuple[Dict[str, mx.array], dict, dict, dict]:
    """Tensors (Hugging Face names), mlx-lm config, raw metadata and per-layer quantization.

    Returns:
        ``(weights, config, metadata, quantized)`` where ``quantized`` maps a
        layer path (``model.layers.0.self_attn.q_proj``) to its ``{"group_size", "bits"}``.

    Raises:
        ConversionError: missing or corrupt file, unsupported architecture or tensor types.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {path} does not exist")
    infos, data_start = read_tensor_infos(path)
    unsupported = sorted({i.type_name for i in infos if i.type_name not in SUPPORTED})
    if unsupported:
        names = [i.name for i in infos if i.type_name in unsupported][:3]
        raise ConversionError(
            f"{path.name} holds tensors of type {', '.join(unsupported)} (e.g. {', '.join(names)}), "
            f"which cannot be converted without losing precision; supported types: "
            f"{', '.join(SUPPORTED)}. Use a Q4_0/Q4_1/Q8_0/F16 GGUF or the Hugging Face checkpoint"
        )
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ConversionError(f"could not read {path} as GGUF ({exc})") from None
    has_output = any(i.name == "output.weight" for i in infos)
    config = gguf_config(meta, has_output)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = config["model_type"] == "llama"
    weights, quantized = {}, {}
    for info in infos:
        base = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
        if info.type_name == "BF16":
            raw[info.name] = _read_bf16(path, info, data_start)
        names = [info.name]
        if info.type_name in QUANT_BITS:
            names += [f"{base}.scales", f"{base}.biases"]
            quantized[hf_name(info.name)[: -len(".weight")]] = {
                "group_size": 32, "bits": QUANT_BITS[info.type_name],
            }
        for name in names:
            array = raw[name]
            if permuted and re.search(r"\.attn_[qk]\.", name):
                array = unpermute_rows(array, heads if ".attn_q." in name else kv_heads)
            weights[hf_name(name)] = array
    return weights, config, meta, quantized
