"""Benchmark prompts: a JSONL file with ``prompt``, ``messages`` or ``text`` per line.

Read by ``records.read_records`` (one reader for training, bench and eval): a
record's completion (``"completion"``, or a trailing assistant message) is a
reference answer and is left out; the prompt is what precedes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..generate import encode_prompt
from ..records import RecordError, read_records


class BenchError(ValueError):
    """Bad benchmark input (data file, prompt, method, settings)."""


class PromptFileError(RecordError, BenchError):
    """A bad prompts file: a ``RecordError`` (names file and line) and a ``BenchError``."""


@dataclass
class Prompt:
    """One benchmark prompt: its line in the file and its token ids."""

    line: int
    tokens: List[int]


def load_prompts(path: str, tokenizer, limit: Optional[int], max_tokens: int,
                 context: Optional[int], system_prompt: Optional[str] = None,
                 ignore_chat_template: bool = False) -> List[Prompt]:
    """Token prompts from a JSONL file with ``prompt``, ``messages`` or ``text`` per line.

    The chat template is applied as ``specstream-mlx generate`` does
    (``Record.prompt_text``); a completion (reference answer) is left out.

    Raises:
        PromptFileError: (a ``BenchError`` and a ``RecordError``) missing or
            empty file, bad line, or a prompt that with ``max_tokens`` does not
            fit the model's ``context``.
    """
    try:
        records = read_records(path, limit=limit)
    except RecordError as exc:
        raise PromptFileError(str(exc), exc.file, exc.line) from None
    prompts: List[Prompt] = []
    for record in records:
        text = record.prompt_text(tokenizer, system_prompt, ignore_chat_template)
        tokens = encode_prompt(tokenizer, text)
        if context is not None and len(tokens) + max_tokens > context:
            raise PromptFileError(
                f"{record.where}: the prompt has {len(tokens)} tokens; with --max-tokens "
                f"{max_tokens} it exceeds the model's context of {context}: shorten the "
                f"prompt or lower --max-tokens", record.file, record.line)
        prompts.append(Prompt(record.line, tokens))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts: give --num-prompts of at least 1")
    return prompts
