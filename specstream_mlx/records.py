"""JSONL records: the one reader of training data, bench prompts and eval sets.

Each non-blank line of a file is one JSON object of one of these kinds (as in
``mlx_lm.lora``; the first key found, in this order, decides the kind):

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation;
* ``{"prompt": "...", "completion": "..."}``: one user turn and its reply
  (``completion`` may be left out where no completion is needed);
* ``{"text": "..."}``: plain text (training: loss on every token; bench: the
  prompt; eval: refused, it has no reference);
* ``{"tokens": [int, ...], "loss_start": n}``: exact token ids, the loss on
  ``tokens[n:]`` (training only: what ``specstream-mlx distill`` writes, so
  no text round trip changes a distilled answer; ``1 <= n <= len(tokens)``).

A ``prompt`` or ``messages`` record may also carry ``"references"``: a
non-empty list of strings, every acceptable reply (eval scores the best of
them; training and bench use only the completion, conventionally the first).

The completion rule (the same for training, bench and eval):

    A ``messages`` record whose last message has role ``"assistant"`` (and
    comes after at least one other message) has that message as its
    completion; its prompt is the messages before it, formatted with the chat
    template and the generation prompt (``prompts.format_prompt``). A
    ``prompt``/``completion`` record is the same as ``messages``
    ``[{"role": "user", "content": prompt}, {"role": "assistant", "content":
    completion}]``.

So training puts the loss on the completion, bench decodes from the prompt
(the completion, a reference answer, is left out) and eval scores against the
completion, and all three see the same prompt (``Record.prompt_text``).

Every error is a ``RecordError`` whose message starts ``file:line:`` (1-based)
and says what to write instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .prompts import format_prompt

KINDS_HINT = 'one JSON object per line with "prompt" (+ "completion"), "messages" or "text"'


class RecordError(ValueError):
    """A missing data file, or a bad line in one (the message names file and line).

    Attributes:
        file: the file (``None`` for a missing path).
        line: 1-based line number (``None`` for errors about the whole file).
    """

    def __init__(self, message: str, file: Optional[Path] = None, line: Optional[int] = None):
        super().__init__(message)
        self.file, self.line = file, line


@dataclass(frozen=True)
class Record:
    """One validated line.

    Attributes:
        file, line: where it was read (``line`` is 1-based).
        kind: ``"messages"``, ``"prompt"``, ``"text"`` or ``"tokens"``.
        messages: the prompt messages (without the completion); ``None`` for text.
        completion: the completion (trailing assistant message or
            ``"completion"``), or ``None`` when the record has none.
        text: the text of a ``text`` record, else ``None``.
        references: the record's ``"references"`` list, else ``None``.
        tokens, loss_start: of a ``tokens`` record, else ``None``.
    """

    file: Path
    line: int
    kind: str
    messages: Optional[List[Dict[str, str]]] = None
    completion: Optional[str] = None
    text: Optional[str] = None
    references: Optional[List[str]] = None
    tokens: Optional[tuple] = None
    loss_start: Optional[int] = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def prompt_text(self, tokenizer, system_prompt: Optional[str] = None,
                    ignore_chat_template: bool = False) -> str:
        """The prompt as generation sees it (``format_prompt`` of the prompt messages).

        A ``text`` record's text is the prompt (a single user message).
        """
        prompt = self.text if self.kind == "text" else self.messages
        return format_prompt(tokenizer, prompt, system_prompt, ignore_chat_template)


def jsonl_files(path: str, split: Optional[str] = None) -> List[Path]:
    """The JSONL files at ``path``.

    Args:
        path: a file, or (with ``split``) a folder.
        split: for a folder: its ``{split}.jsonl``, else all its ``*.jsonl``.
            ``None``: ``path`` must be a file.

    Raises:
        RecordError: the path does not exist, or is a folder without JSONL
            files (or a folder where a file is needed).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        if split is None:
            raise RecordError(f"{p} is a folder: give a JSONL file", p)
        named = p / f"{split}.jsonl"
        if named.is_file():
            return [named]
        files = sorted(p.glob("*.jsonl"))
        if files:
            return files
        raise RecordError(f"{p} holds no *.jsonl files: put a {split}.jsonl in it", p)
    wanted = "a JSONL file" if split is None else f"a JSONL file or a folder with {split}.jsonl"
    raise RecordError(f"{p} does not exist: give {wanted}", p)


def read_records(path: str, split: Optional[str] = None, *, limit: Optional[int] = None,
                 need_completion: bool = False, allow_text: bool = True,
                 allow_tokens: bool = False) -> List[Record]:
    """Read and validate the records of a JSONL file (or of a folder's split).

    Args:
        path, split: as ``jsonl_files``.
        limit: stop after this many records (later lines are not read).
        need_completion: ``prompt`` and ``messages`` records must have a
            completion (training, eval).
        allow_text: accept ``text`` records (not for eval: no reference).
        allow_tokens: accept ``tokens`` records (training only).

    Returns:
        The records in file order (blank lines skipped).

    Raises:
        RecordError: a missing path, an empty file, or a bad line (the
            message starts ``file:line:``).
    """
    records: List[Record] = []
    files = jsonl_files(path, split)
    if limit is not None and limit < 1:
        return records
    for file in files:
        count = 0
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                records.append(parse_record(line, file, number, need_completion, allow_text,
                                            allow_tokens))
                count += 1
                if limit is not None and len(records) >= limit:
                    return records
        if count == 0:
            raise RecordError(f"{file} holds no records: write {KINDS_HINT}", file)
    return records


def parse_record(line: str, file: Path, number: int, need_completion: bool = False,
                 allow_text: bool = True, allow_tokens: bool = False) -> Record:
    """Validate one JSONL line (see ``read_records``)."""
    where = f"{file}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: not valid JSON ({exc.msg}): write {KINDS_HINT}",
                          file, number) from None
    return to_record(record, file, number, need_completion, allow_text, allow_tokens)


def to_record(record, file: Path, number: int, need_completion: bool = False,
              allow_text: bool = True, allow_tokens: bool = False) -> Record:
    """Validate one decoded JSON value (see ``read_records``)."""
    where = f"{file}:{number}"

    def fail(message: str) -> RecordError:
        return RecordError(f"{where}: {message}", file, number)

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}: write {KINDS_HINT}")
    if "tokens" in record:
        if not allow_tokens:
            raise fail('"tokens" records are training data (token ids): give text records here')
        tokens, start = record["tokens"], record.get("loss_start")
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise fail('"tokens" must be a non-empty list of token ids (integers >= 0)')
        if not isinstance(start, int) or isinstance(start, bool) or not 1 <= start <= len(tokens):
            raise fail(f'"loss_start" must be an integer in 1..{len(tokens)} (where the answer '
                       f'starts), got {start!r}')
        return Record(file, number, "tokens", tokens=tuple(tokens), loss_start=start)
    references = record.get("references")
    if references is not None and ("messages" in record or "prompt" in record):
        if not isinstance(references, list) or not references or not all(
                isinstance(r, str) for r in references):
            raise fail('"references" must be a non-empty list of strings (every acceptable '
                       'reply)')
        references = list(references)
    else:
        references = None
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise fail('"messages" must be a non-empty list of {"role": str, "content": str} '
                       'objects')
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        completion = None
        if messages[-1]["role"] == "assistant":
            if len(messages) == 1:
                raise fail('"messages" holds only an assistant message: put the prompt '
                           'in a "user" message before it')
            messages, completion = messages[:-1], messages[-1]["content"]
        elif need_completion:
            raise fail(f'"messages" ends with a "{messages[-1]["role"]}" message: add the '
                       f'expected reply as a last "assistant" message')
        return Record(file, number, "messages", messages=messages, completion=completion,
                      references=references)
    if "prompt" in record:
        prompt, completion = record["prompt"], record.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail('"prompt" must be a non-empty string')
        if completion is None and need_completion:
            raise fail('"prompt" has no "completion": add the expected reply as "completion"')
        if completion is not None and not isinstance(completion, str):
            raise fail(f'"completion" must be a string, got {type(completion).__name__}')
        return Record(file, number, "prompt", messages=[{"role": "user", "content": prompt}],
                      completion=completion, references=references)
    if "text" in record and allow_text:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise fail('"text" must be a non-empty string')
        return Record(file, number, "text", text=record["text"])
    if allow_text:
        raise fail(f'expected a "prompt", "messages" or "text" field: write {KINDS_HINT}')
    raise fail('expected "prompt" + "completion" or "messages" ending with an "assistant" '
               'message (the reference)')


__all__ = ["RecordError", "Record", "jsonl_files", "read_records", "parse_record", "to_record"]
