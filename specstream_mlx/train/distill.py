"""Self-distillation: replace completions by the model's own greedy continuation.

In lossless mode verification accepts a draft only where it equals the base
model's greedy choice, so the best training targets for the streams are the
base model's own greedy outputs on the training prompts.

``distill`` serves ``train --distill`` (a cache aligned with the data file);
``read_prompts`` / ``distill_corpus`` / ``read_corpus`` serve ``specstream-mlx
distill``: an appending, resumable, deduplicated corpus (docs/distill.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..records import KINDS_HINT, RecordError, jsonl_files, parse_record, to_record
from .data import Example


def distill(
    base,
    tokenizer,
    examples: Sequence[Example],
    max_tokens: int = 128,
    batch_size: int = 32,
    cache_file: Optional[Path] = None,
) -> List[Example]:
    """Greedy continuations of each example's prompt by ``base`` (batched).

    Args:
        base: the mlx-lm model whose outputs the streams should learn.
        tokenizer: its tokenizer.
        examples: examples whose ``tokens[:loss_start]`` are prompts (an
            example with no prompt part uses its first half as the prompt).
        max_tokens: tokens generated per prompt.
        batch_size: prompts decoded together.
        cache_file: JSONL of finished examples; reused (and extended) so an
            interrupted distillation does not start over.

    Returns:
        New examples: prompt + greedy continuation, loss on the continuation.
    """
    from mlx_lm import batch_generate

    prompts = []
    for example in examples:
        cut = example.loss_start or max(1, len(example.tokens) // 2)
        prompts.append(list(example.tokens[:cut]))
    done: List[Example] = []
    if cache_file is not None and cache_file.is_file():
        lines = cache_file.read_text().splitlines()
        for number, line in enumerate(lines[: len(examples)], 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{cache_file}:{number} is not valid JSON; delete the file") from None
                # A run killed while appending leaves a partial last line: drop it.
                cache_file.write_text("".join(f"{kept}\n" for kept in lines[: number - 1]))
                break
            if record["tokens"][: record["loss_start"]] != prompts[number - 1]:
                raise ValueError(
                    f"{cache_file}:{number} holds another prompt than the data's example "
                    f"{number}: the data changed since it was written; delete the file"
                )
            done.append(Example(tuple(record["tokens"]), record["loss_start"]))
    prompts = prompts[len(done):]
    tic = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        response = batch_generate(base, tokenizer, chunk, max_tokens=max_tokens,
                                  return_token_ids=True)
        new = [Example(tuple(p + list(ids)), len(p)) for p, ids in zip(chunk, response.token_ids)]
        done.extend(new)
        if cache_file is not None:
            with open(cache_file, "a") as handle:
                for e in new:
                    handle.write(json.dumps({"tokens": list(e.tokens), "loss_start": e.loss_start}) + "\n")
        rate = (start + len(chunk)) / (time.perf_counter() - tic)
        print(f"\r[distill] {len(done)}/{len(examples)} prompts ({rate:.2f} prompts/s)",
              file=sys.stderr, end="", flush=True)
    print(file=sys.stderr)
    return done


# ---------------------------------------------------------------- a distilled corpus
#
# ``specstream-mlx distill`` (see docs/distill.md): the greedy answers of the base
# model to a prompt file, appended to a corpus that grows across runs. One line
# per distinct prompt:
#
#     {"tokens": [prompt ids..., answer ids...], "loss_start": len(prompt ids),
#      "max_tokens": 128, "source": "gsm8k"}
#
# ``tokens``/``loss_start`` are exactly the ids the trainer needs (no re-tokenizing
# of decoded text); ``max_tokens`` (the answer's cap: an answer of that length was
# cut, a shorter one ended at an EOS token, which is not stored, as mlx-lm's
# batch_generate leaves it out) and ``source`` (the prompt record's, if any) are
# for bookkeeping. A prompt is known by the hash of its token ids (``prompt_key``).

#: Chunks of this many batches go to one ``batch_generate`` call: mlx-lm refills the
#: batch as answers end, so answers of varied length keep all rows busy; the corpus
#: is appended (and flushed) after each chunk.
CHUNK_BATCHES = 4


@dataclass(frozen=True)
class DistillPrompt:
    """One prompt to answer.

    Attributes:
        tokens: the prompt's token ids (as ``generate``/``bench``/training encode it).
        max_tokens: most answer tokens.
        where: ``file:line`` of its record.
        source: the record's ``"source"`` label, if any.
    """

    tokens: Tuple[int, ...]
    max_tokens: int
    where: str
    source: Optional[str] = None

    @property
    def key(self) -> str:
        return prompt_key(self.tokens)


def prompt_key(tokens: Sequence[int]) -> str:
    """The identity of a prompt in a corpus: a hash of its token ids."""
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:32]


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def read_prompts(path, tokenizer, max_tokens: int = 128,
                 use_chat_template: bool = True) -> List[DistillPrompt]:
    """The prompts of a JSONL file, tokenized, in file order (duplicates kept).

    Records are those of ``records`` (``prompt``, ``messages``, ``text``); the
    prompt is what generation decodes from (``Record.prompt_text``: a
    ``messages`` record ending with an ``assistant`` message is prompted with
    the messages before it, one ending with a ``user`` message with all of them).
    A record may carry ``"max_tokens"`` (a positive integer: its own answer cap,
    instead of ``max_tokens``) and ``"source"`` (a string, copied to the corpus).

    Raises:
        RecordError: a missing file, no prompts, or a bad line (``file:line: ...``).
        ValueError: ``max_tokens`` is not a positive integer.
    """
    from ..generate import encode_prompt
    from ..prompts import has_chat_template

    _positive(max_tokens, "max_tokens")
    ignore_template = not (use_chat_template and has_chat_template(tokenizer))
    prompts: List[DistillPrompt] = []
    files = jsonl_files(str(path))
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = parse_record(line, file, number)
                raw = json.loads(line)
                where = record.where
                cap = raw.get("max_tokens", max_tokens)
                try:
                    cap = _positive(cap, '"max_tokens"')
                except ValueError as exc:
                    raise RecordError(f"{where}: {exc}", file, number) from None
                source = raw.get("source")
                if source is not None and not isinstance(source, str):
                    raise RecordError(f'{where}: "source" must be a string, got '
                                      f'{type(source).__name__}', file, number)
                text = record.prompt_text(tokenizer, ignore_chat_template=ignore_template)
                try:
                    tokens = encode_prompt(tokenizer, text)
                except ValueError as exc:
                    raise RecordError(f"{where}: {exc}", file, number) from None
                prompts.append(DistillPrompt(tuple(int(t) for t in tokens), cap, where, source))
    if not prompts:
        raise RecordError(f"{path} holds no prompts: write {KINDS_HINT}", Path(path))
    return prompts


def _corpus_example(line: bytes, where: str) -> Example:
    """One corpus line as an ``Example`` (raises ``RecordError`` naming ``where``)."""
    file, _, number = where.rpartition(":")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{where}: not valid JSON ({exc}): not a line distill wrote; "
                          f"delete the line or the file", Path(file), int(number)) from None
    if not isinstance(record, dict) or "tokens" not in record:
        raise RecordError(f'{where}: expected {{"tokens": [ids], "loss_start": n}}: not a line '
                          f'distill wrote; delete the line or the file', Path(file), int(number))
    checked = to_record(record, Path(file), int(number), allow_tokens=True)  # the one validation
    return Example(checked.tokens, checked.loss_start)


def read_corpus(path, repair: bool = False) -> List[Example]:
    """The examples of a corpus that ``distill_corpus`` wrote, in file order.

    A last line without its newline is what a run killed while appending
    leaves: it is ignored, and with ``repair`` cut off the file (its prompt is
    answered again) if every complete line is a sound record. Examples with an empty answer (``loss_start ==
    len(tokens)``: the model ended at once) are kept: they mark their prompt done.

    Raises:
        RecordError: a missing file, or a complete line that is not a corpus record.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecordError(f"{path} does not exist: give a corpus that distill wrote", path)
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    examples = []
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if line.strip():
            examples.append(_corpus_example(line, f"{path}:{number}"))
    if repair and complete < len(data):  # only once the rest has been found sound
        with open(path, "r+b") as handle:
            handle.truncate(complete)
    return examples


@contextmanager
def _locked_append(path: Path):
    """``path`` opened for appending, locked against a second writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            raise ValueError(f"{path} is being written by another distill run: wait for it "
                             f"or give another --out") from None
        yield handle


def distill_corpus(base, tokenizer, prompts: Sequence[DistillPrompt], out,
                   batch_size: int = 48, limit: Optional[int] = None,
                   progress: bool = True) -> dict:
    """Append the greedy answers of ``base`` to ``prompts`` to the corpus ``out``.

    Resumable: prompts the corpus already answers (same token ids) are skipped,
    and a partial last line left by a killed run is cut off and redone. A
    prompt given twice is answered once (its first occurrence, with its
    ``max_tokens``). Answers are appended in prompt order after each chunk of
    ``CHUNK_BATCHES * batch_size`` prompts, one write, flushed and synced, so a
    prefix of the corpus is a prefix of the (shuffled) prompt file.

    Args:
        base: the mlx-lm model (greedy decoding with ``mlx_lm.batch_generate``).
        tokenizer: its tokenizer (EOS ids end an answer).
        prompts: from ``read_prompts``.
        out: the corpus JSONL (created if missing).
        batch_size: rows decoded together.
        limit: answer only the first ``limit`` distinct prompts (a trial run).
        progress: print progress lines to stderr.

    Returns:
        ``{"prompts": distinct prompts, "duplicates": repeated prompts skipped,
        "already": answered before, "answered": answered now, "tokens":
        answer tokens generated now, "prompt_tokens": their prompts' tokens,
        "seconds": wall time of the generation, "tokens_per_s": tokens /
        seconds, "corpus_records": records in the corpus now, "corpus_tokens":
        answer tokens in it}``.

    Raises:
        ValueError: ``batch_size`` or ``limit`` is not a positive integer, or
            another run is writing ``out``.
        RecordError: the corpus has a bad (complete) line.
    """
    from mlx_lm import batch_generate

    _positive(batch_size, "batch_size")
    if limit is not None:
        _positive(limit, "limit")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give the corpus JSONL file to append to")
    distinct, seen = [], set()
    for prompt in prompts:
        if prompt.key not in seen:
            seen.add(prompt.key)
            distinct.append(prompt)
    duplicates = len(prompts) - len(distinct)
    if limit is not None:
        distinct = distinct[:limit]

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    with _locked_append(out) as handle:
        existing = read_corpus(out, repair=True)
        done = {prompt_key(e.tokens[: e.loss_start]) for e in existing}
        pending = [p for p in distinct if p.key not in done]
        already = len(distinct) - len(pending)
        corpus_records = len(existing)
        corpus_tokens = sum(len(e.tokens) - e.loss_start for e in existing)
        say(f"[distill] {len(distinct)} distinct prompts ({duplicates} duplicates skipped), "
            f"{already} answered before in {out}, {len(pending)} to answer")
        tokens = prompt_tokens = answered = 0
        tic = time.perf_counter()
        chunk_size = CHUNK_BATCHES * batch_size
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            # Decode similar lengths together (less padding), write in prompt order.
            order = sorted(range(len(chunk)), key=lambda i: (len(chunk[i].tokens), i))
            response = batch_generate(
                base, tokenizer, [list(chunk[i].tokens) for i in order],
                max_tokens=[chunk[i].max_tokens for i in order], return_token_ids=True,
                completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 8))
            answers = [None] * len(chunk)
            for i, ids in zip(order, response.token_ids):
                answers[i] = [int(t) for t in ids]
            lines = []
            for prompt, answer in zip(chunk, answers):
                record = {"tokens": list(prompt.tokens) + answer,
                          "loss_start": len(prompt.tokens), "max_tokens": prompt.max_tokens}
                if prompt.source is not None:
                    record["source"] = prompt.source
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
                tokens += len(answer)
                prompt_tokens += len(prompt.tokens)
            handle.write("".join(lines).encode())
            handle.flush()
            os.fsync(handle.fileno())
            answered += len(chunk)
            corpus_records += len(chunk)
            corpus_tokens += sum(len(a) for a in answers)
            seconds = time.perf_counter() - tic
            rate = tokens / seconds if seconds > 0 else 0.0
            left = (len(pending) - answered) * seconds / answered
            say(f"[distill] {already + answered}/{len(distinct)} prompts, {tokens} tokens "
                f"this run, {rate:.1f} tokens/s, about {left / 60:.0f} min left")
    seconds = time.perf_counter() - tic
    return {"prompts": len(distinct), "duplicates": duplicates, "already": already,
            "answered": answered, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "corpus_records": corpus_records, "corpus_tokens": corpus_tokens}
