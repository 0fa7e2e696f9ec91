"""Benchmark prompts: a JSONL file with ``prompt``, ``messages`` or ``text`` per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..generate import encode_prompt
from ..prompts import format_prompt


class BenchError(ValueError):
    """Bad benchmark input (data file, prompt, method, settings)."""


@dataclass
class Prompt:
    """One benchmark prompt: its line in the file and its token ids."""

    line: int
    tokens: List[int]


def load_prompts(path: str, tokenizer, limit: Optional[int], max_tokens: int,
                 context: Optional[int], system_prompt: Optional[str] = None,
                 ignore_chat_template: bool = False) -> List[Prompt]:
    """Token prompts from a JSONL file with ``prompt``, ``messages`` or ``text`` per line.

    The chat template is applied as ``specstream-mlx generate`` does; for
    ``messages`` a trailing assistant message (a reference answer) is dropped.

    Raises:
        BenchError: missing/empty file, bad line, or a prompt that with
            ``max_tokens`` does not fit the model's ``context``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"data file {file} does not exist: give a JSONL file with --data")
    prompts: List[Prompt] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if limit is not None and len(prompts) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
        content = _record_prompt(record, f"{file}:{number}")
        text = format_prompt(tokenizer, content, system_prompt, ignore_chat_template)
        tokens = encode_prompt(tokenizer, text)
        if context is not None and len(tokens) + max_tokens > context:
            raise BenchError(
                f"{file}:{number}: the prompt has {len(tokens)} tokens; with --max-tokens "
                f"{max_tokens} it exceeds the model's context of {context}: shorten the "
                f"prompt or lower --max-tokens")
        prompts.append(Prompt(number, tokens))
    if not prompts:
        raise BenchError(f"{file} holds no prompts: one JSON object per line with "
                         f'"prompt", "messages" or "text"')
    return prompts


def _record_prompt(record, where: str):
    if not isinstance(record, dict):
        raise BenchError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "content" in m for m in messages):
            raise BenchError(f'{where}: "messages" must be a non-empty list of '
                             f'{{"role", "content"}} objects')
        if len(messages) > 1 and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return messages
    for key in ("prompt", "text"):
        if key in record:
            if not isinstance(record[key], str) or not record[key].strip():
                raise BenchError(f'{where}: "{key}" must be a non-empty string')
            return record[key]
    raise BenchError(f'{where}: expected a "prompt", "messages" or "text" field')
