"""Training data: JSONL in mlx-lm's formats, tokenized with loss masks.

The files are read by ``records.read_records`` (one reader for training, bench
and eval; its docstring states the completion rule). Each line is one of:

* ``{"text": "..."}``: loss on every token;
* ``{"prompt": "...", "completion": "..."}``: loss on the completion only;
* ``{"messages": [..., {"role": "assistant", "content": ...}]}``: loss on the
  trailing assistant message only (the completion); the prompt is the
  messages before it with the chat template's generation prompt.

The prompt tokens are those ``generate``, ``bench`` and ``eval`` decode from
(``encode_prompt`` of ``Record.prompt_text``), so the streams learn on the
prompts they will see.

``--data`` may be a file or a folder (``train.jsonl`` / ``valid.jsonl`` inside,
or every ``*.jsonl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from ..generate import encode_prompt
from ..prompts import has_chat_template
from ..records import Record, RecordError, read_records, to_record

DataError = RecordError
"""A data file is missing or has a bad line (the message names file and line).

An alias of ``records.RecordError``, kept for callers that catch ``DataError``.
"""


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


def _chat(tokenizer, messages, add_generation_prompt=False) -> List[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, dict):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _templated_completion(tokenizer, record: Record, prompt_text: str) -> List[int]:
    """Tokens of the completion as the chat template writes it after the prompt."""
    messages = record.messages + [{"role": "assistant", "content": record.completion}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(full, str) and full.startswith(prompt_text):
        return list(tokenizer.encode(full[len(prompt_text):], add_special_tokens=False))
    # A template that writes earlier turns differently once a reply follows:
    # the reply's tokens are what the templated conversation adds to the prompt's.
    head = _chat(tokenizer, record.messages, add_generation_prompt=True)
    return _chat(tokenizer, messages)[len(head):]


def encode_record(record: Union[Record, dict], tokenizer, use_chat_template: bool = True) -> Example:
    """Tokenize one record into an ``Example`` (loss on the completion, see ``records``).

    Args:
        record: a ``records.Record`` or a decoded JSONL line.

    Raises:
        RecordError: the record has none of the known formats, or no completion.
    """
    if not isinstance(record, Record):
        record = to_record(record, Path("<record>"), 1, need_completion=True, allow_tokens=True)
    if record.kind == "text":
        return Example(tuple(tokenizer.encode(record.text)), 0)
    if record.kind == "tokens":
        return Example(record.tokens, record.loss_start)
    if record.completion is None:
        raise RecordError(f"{record.where}: training needs a completion: give \"completion\" "
                          f"or end \"messages\" with an \"assistant\" message",
                          record.file, record.line)
    templated = use_chat_template and has_chat_template(tokenizer)
    if record.kind == "messages" and not templated:
        raise RecordError(f'{record.where}: "messages" needs a tokenizer with a chat template: '
                          f'use "prompt" + "completion" records', record.file, record.line)
    prompt_text = record.prompt_text(tokenizer, ignore_chat_template=not templated)
    head = encode_prompt(tokenizer, prompt_text)
    if templated:
        tail = _templated_completion(tokenizer, record, prompt_text)
    else:
        tail = list(tokenizer.encode(record.completion, add_special_tokens=False))
    full = list(head) + list(tail)
    return Example(tuple(full), min(len(head), len(full) - 1))


def load_examples(path: str, tokenizer, split: str = "train",
                  use_chat_template: bool = True) -> List[Example]:
    """Read and tokenize every record of the data files.

    Raises:
        DataError: (``RecordError``) naming the file and line number of the
            first bad line, or no example of at least two tokens.
    """
    examples = []
    for record in read_records(path, split, need_completion=True, allow_tokens=True):
        try:
            example = encode_record(record, tokenizer, use_chat_template)
        except RecordError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{record.where}: {exc}", record.file, record.line) from None
        if len(example.tokens) >= 2 and example.loss_start < len(example.tokens):
            examples.append(example)  # (a distilled answer may be empty: nothing to learn)
    if not examples:
        raise DataError(f"{path} holds no example of two or more tokens: give longer texts")
    return examples


def first_target_tokens(examples: Sequence[Example], count: int,
                        max_seq_len: Optional[int] = None) -> List[Example]:
    """The shortest prefix of ``examples`` (file order) with ``count`` target tokens.

    A data learning curve trains on prefixes of one corpus (84k, 250k, ...
    tokens); a distilled corpus keeps its shuffled prompt order, so each prefix
    mixes every source. Targets are ``tokens[loss_start:]``, counted within the
    first ``max_seq_len`` tokens (what training keeps) when it is given.

    Raises:
        DataError: ``count`` is not positive, or the examples hold fewer target tokens.
    """
    if count <= 0:
        raise DataError(f"--data-tokens must be a positive number of target tokens, not {count}")
    total = 0
    for i, example in enumerate(examples):
        kept = len(example.tokens) if max_seq_len is None else min(len(example.tokens), max_seq_len)
        total += max(0, kept - example.loss_start)
        if total >= count:
            return list(examples[: i + 1])
    raise DataError(f"the data holds {total} target tokens, fewer than --data-tokens {count}: "
                    f"distill more (docs/distill.md) or ask for fewer")


def batch_indices(count: int, batch_size: int, seed: int, start_step: int = 0,
                  lengths: Optional[Sequence[int]] = None, window: int = 32) -> Iterator[np.ndarray]:
    """Endless deterministic batches of example indices.

    Epoch ``e`` is a permutation seeded with ``seed + e``; the batch of step
    ``k`` is the same whatever ``start_step`` is (so resumed runs continue
    exactly).

    With ``lengths`` (tokens per example), batches are grouped by length as
    mlx-lm's trainer does, so little of a batch is padding: each run of
    ``window`` batches of the permutation is sorted by length and cut into
    batches, and the epoch's batches are then shuffled (same seed). Every
    example is still seen once per epoch.
    """
    per_epoch = max(1, count // batch_size)
    step, epoch_batches = start_step, (None, None)
    while True:
        epoch, index = divmod(step, per_epoch)
        if epoch_batches[0] != epoch:
            rng = np.random.default_rng(seed + epoch)
            order = rng.permutation(count)
            if count < batch_size:
                order = np.resize(order, batch_size)
            order = order[: per_epoch * batch_size]
            if lengths is not None:
                span = window * batch_size
                order = np.concatenate([
                    chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
                    for chunk in np.split(order, range(span, len(order), span))])
            batches = order.reshape(per_epoch, batch_size)
            if lengths is not None:
                batches = batches[rng.permutation(per_epoch)]
            epoch_batches = (epoch, batches)
        yield epoch_batches[1][index]
        step += 1


def training_batches(examples: Sequence[Example], batch_size: int, seed: int, start_step: int,
                     max_seq_len: int, group_by_length: bool) -> Iterator[np.ndarray]:
    """``batch_indices`` over training examples, grouped by their (truncated) lengths when asked."""
    lengths = [min(len(e.tokens), max_seq_len) for e in examples] if group_by_length else None
    return batch_indices(len(examples), batch_size, seed, start_step, lengths=lengths)


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
