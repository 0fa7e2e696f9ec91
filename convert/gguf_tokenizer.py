"""Build a Hugging Face tokenizer (``tokenizer.json`` + config) from GGUF metadata.

Byte-level BPE tokenizers (``tokenizer.ggml.model == "gpt2"``: GPT-2, SmolLM,
Llama 3, Qwen 2) are rebuilt exactly from the token list, the merges, the
token types (control tokens become special tokens) and the pre-tokenizer
named by ``tokenizer.ggml.pre``. The chat template and the BOS/EOS/UNK/PAD
tokens go to ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .common import ConversionError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_GPT2 = ("gpt-2", "gpt2", "default", "jina-v2-code")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4


def _meta(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def _pre_tokenizer(kind):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[kind]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if kind not in _GPT2 and kind is not None:
        warnings.warn(
            f"GGUF pre-tokenizer {kind!r} is not known to specstream-mlx; using GPT-2's "
            f"splitting, so some texts may tokenize differently from llama.cpp"
        )
    return byte_level


def write_tokenizer(meta: dict, out: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out``.

    Raises:
        ConversionError: no tokenizer in the metadata, or a tokenizer model other than BPE.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _meta(meta, "tokenizer.ggml.model")
    if kind is None:
        raise ConversionError("the GGUF file has no tokenizer (tokenizer.ggml.* metadata)")
    if kind != "gpt2":
        raise ConversionError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            f"convert the Hugging Face checkpoint with --hf-path instead"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = _meta(meta, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("the GGUF token list repeats tokens; it cannot be a BPE vocabulary")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ConversionError(f"the GGUF tokenizer is inconsistent: {exc}") from None
    tok.pre_tokenizer = _pre_tokenizer(_meta(meta, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)

    def token_of(name):
        index = _meta(meta, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = token_of("bos")
    add_bos = bool(_meta(meta, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(Path(out) / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unknown", "padding"):
        token = token_of(name)
        if token is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            config[f"{key}_token"] = token
    template = _meta(meta, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
