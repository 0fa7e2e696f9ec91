"""Training data: JSONL in mlx-lm's formats, tokenized with loss masks.

Each line is one of (as in ``mlx_lm.lora``):

* ``{"text": "..."}``: loss on every token;
* ``{"prompt": "...", "completion": "..."}``: loss on the completion only;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat template
  applied; loss on the last assistant message only.

``--data`` may be a file or a folder (``train.jsonl`` / ``valid.jsonl`` inside,
or every ``*.jsonl``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

import numpy as np


class DataError(ValueError):
    """A data file is missing or has a bad line (the message names file and line)."""


@dataclass(frozen=True)
class Example:
    """One tokenized example.

    Attributes:
        tokens: token ids.
        loss_start: index of the first token that carries loss (targets are
            ``tokens[loss_start:]``).
    """

    tokens: tuple
    loss_start: int


def data_files(path: str, split: str = "train") -> List[Path]:
    """JSONL files for ``path``: the file itself, or ``{split}.jsonl`` / all ``*.jsonl`` in a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        named = p / f"{split}.jsonl"
        if named.is_file():
            return [named]
        files = sorted(p.glob("*.jsonl"))
        if files:
            return files
        raise DataError(f"{p} holds no *.jsonl files")
    raise DataError(f"data path {p} does not exist")


def _chat(tokenizer, messages, add_generation_prompt=False) -> List[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, dict):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_record(record: dict, tokenizer, use_chat_template: bool = True) -> Example:
    """Tokenize one JSONL record into an ``Example``.

    Raises:
        ValueError: the record has none of the known formats.
    """
    has_template = use_chat_template and getattr(tokenizer, "chat_template", None)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        if not has_template:
            raise ValueError('"messages" needs a tokenizer with a chat template')
        full = _chat(tokenizer, messages)
        prompt = _chat(tokenizer, messages[:-1], add_generation_prompt=True)
        return Example(tuple(full), min(len(prompt), len(full) - 1))
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('"prompt" and "completion" must be strings')
        if has_template:
            messages = [{"role": "user", "content": prompt}]
            head = _chat(tokenizer, messages, add_generation_prompt=True)
            full = _chat(tokenizer, messages + [{"role": "assistant", "content": completion}])
        else:
            head = tokenizer.encode(prompt)
            full = head + tokenizer.encode(completion, add_special_tokens=False)
        return Example(tuple(full), min(len(head), len(full) - 1))
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
        return Example(tuple(tokenizer.encode(record["text"])), 0)
    raise ValueError('expected "text", "prompt"+"completion", or "messages"')


def load_examples(path: str, tokenizer, split: str = "train",
                  use_chat_template: bool = True) -> List[Example]:
    """Read and tokenize every line of the data files.

    Raises:
        DataError: naming the file and line number of the first bad line.
    """
    examples = []
    for file in data_files(path, split):
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("each line must be a JSON object")
                    example = encode_record(record, tokenizer, use_chat_template)
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{file}:{number}: {exc}") from None
                if len(example.tokens) >= 2:
                    examples.append(example)
    if not examples:
        raise DataError(f"no usable examples in {path}")
    return examples


def batch_indices(count: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless deterministic batches of example indices.

    Epoch ``e`` is a permutation seeded with ``seed + e``; the batch of step
    ``k`` is the same whatever ``start_step`` is (so resumed runs continue
    exactly).
    """
    per_epoch = max(1, count // batch_size)
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(count)
        if count < batch_size:
            order = np.resize(order, batch_size)
        yield order[index * batch_size : (index + 1) * batch_size]
        step += 1


def collate(examples: Sequence[Example], indices: Sequence[int], max_seq_len: int) -> tuple:
    """Pad the chosen examples into one batch.

    Returns:
        ``(tokens, loss_mask)``: ``(B, T)`` int32 and ``(B, T)`` bool numpy
        arrays, ``T <= max_seq_len``, padded with 0 (mask False). The mask is
        True on tokens that are loss targets.
    """
    chosen = [examples[i] for i in indices]
    length = min(max_seq_len, max(len(e.tokens) for e in chosen))
    tokens = np.zeros((len(chosen), length), dtype=np.int32)
    mask = np.zeros((len(chosen), length), dtype=bool)
    for row, example in enumerate(chosen):
        seq = example.tokens[:length]
        tokens[row, : len(seq)] = seq
        mask[row, example.loss_start : len(seq)] = True
    return tokens, mask
