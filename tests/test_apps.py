"""The in-process embedding example in apps/ runs against a checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .serving import write_text_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "apps" / "python_embed_example.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("apps"))


@pytest.mark.parametrize("mode", ["direct", "engine"])
def test_python_embed_example(checkpoint, mode):
    from specstream_mlx import generate, load
    from specstream_mlx.prompts import format_prompt

    prompt = "Say something."
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(checkpoint), "--prompt", prompt,
         "--max-tokens", "12", "--mode", mode],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    model, tokenizer = load(str(checkpoint))
    expected = generate(model, tokenizer, format_prompt(tokenizer, prompt), max_tokens=12)
    if mode == "engine":  # the example stops at a blank line
        expected = expected.split("\n\n")[0]
    text, stats = run.stdout.rsplit("\n[", 1)
    assert text == expected
    assert re.match(r"\d+ tokens, .*tokens/s, [\d.]+ tokens per forward\]", stats)
