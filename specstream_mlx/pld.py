"""Prompt-lookup decoding (PLD): drafts copied from earlier text, verified by the model.

The draft for the next step is what followed the most recent earlier
occurrence of the last ``n`` emitted tokens (``n`` from ``max_ngram`` down to
``min_ngram``) in the prompt plus the output so far (Saxena, 2023, "Prompt
Lookup Decoding"; also ``prompt_lookup_num_tokens`` in Hugging Face
transformers). It costs no model work, so it wins when the output copies from
the prompt (summaries, edits, code, quoting) and drafts nothing otherwise.

Verification goes through the same decode loop as Speculative Streaming
(``decode.decode(..., drafter=PromptLookupDrafter(...))``): the draft is a
chain, its forward runs no stream rows (lossless mode), and greedy output
equals the model's own.
"""

from __future__ import annotations

from typing import List, Sequence

import mlx.core as mx
import numpy as np

from .decode import Draft, StreamDrafter, TreeSettings, tree_rows
from .masks import chain_rows
from .tree import chain_tree, graft_chain


def find_draft(history: Sequence[int], max_ngram: int = 3, min_ngram: int = 1,
               num_tokens: int = 4) -> List[int]:
    """Tokens that followed the last earlier occurrence of the history's tail.

    Longer n-grams are tried first; for one ``n`` the most recent earlier match
    wins (it is the likeliest to continue the same way). The tail itself (the
    last ``n`` tokens) is not a match.

    Args:
        history: token ids, oldest first (prompt, then output).
        max_ngram, min_ngram: n-gram sizes to try, longest first (``>= 1``).
        num_tokens: at most this many draft tokens.

    Returns:
        Up to ``num_tokens`` draft tokens; empty when nothing matches.

    Raises:
        ValueError: on sizes below 1 or ``min_ngram > max_ngram``.
    """
    if min_ngram < 1 or max_ngram < min_ngram or num_tokens < 0:
        raise ValueError(
            f"PLD needs 1 <= min n-gram <= max n-gram and num tokens >= 0, got "
            f"{min_ngram}, {max_ngram}, {num_tokens}"
        )
    length = len(history)
    if num_tokens == 0 or length < 2:
        return []
    seq = np.asarray(history, dtype=np.int64)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = seq[length - n:]
        # Candidate starts 0 .. length-n-1: windows that end before the tail starts
        # can overlap it, but never are it.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)
        hits = np.nonzero((windows == tail).all(axis=1))[0]
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in seq[start : start + num_tokens]]
    return []


class PromptLookupDrafter:
    """A ``decode.Drafter`` that proposes a chain from ``find_draft``.

    Args:
        model: the model (its mode decides whether rows need stream rows:
            in shared mode main rows see their own streams, so they run).
        max_ngram, min_ngram, num_tokens: as in ``find_draft``.
    """

    uses_streams = False
    stream_logits_depth = 0

    def __init__(self, model, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 4):
        find_draft([], max_ngram, min_ngram, num_tokens)  # validates the sizes
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth = num_tokens
        self.shared = model.config.mode == "shared"

    def chain(self, history: List[int], budget: int) -> List[int]:
        """The lookup draft for the next step, within ``budget`` (tokens still wanted)."""
        return find_draft(history, self.max_ngram, self.min_ngram,
                          min(self.max_depth, max(budget - 1, 0)))

    def propose(self, history: List[int], budget: int) -> Draft:
        drafts = self.chain(history, budget)
        size = len(drafts) + 1
        rows = chain_rows(size, np.arange(size) if self.shared else None)
        return Draft(chain_tree(len(drafts)), rows, mx.array(np.array(drafts, dtype=np.int32)))

    def observe(self, out, node: int, stream_logits=None) -> None:
        pass


class StreamLookupDrafter:
    """A ``decode.Drafter`` whose tree is the streams' tree plus a prompt-lookup chain.

    Each step drafts the streams' tree (as ``StreamDrafter`` with ``tree``)
    and, when ``find_draft`` finds an earlier occurrence of the text's tail,
    grafts the tokens that followed it below the root (``tree.graft_chain``:
    where the lookup agrees with a stream guess the nodes are shared). One
    forward verifies both; every node gets stream rows, so whichever path is
    accepted, its last node's streams draft the next tree. The streams cover
    free text, the lookup covers text copied from the prompt (summaries,
    quotes, code edits), and a step keeps the longer accepted run. Without a
    lookup match a step is exactly ``StreamDrafter``'s.

    Args:
        model: the model.
        tree: the streams' tree settings (early-exit pruning applies only to
            steps without a grafted chain).
        max_ngram, min_ngram, num_tokens: as in ``find_draft``.
    """

    uses_streams = True

    def __init__(self, model, tree: TreeSettings, max_ngram: int = 3, min_ngram: int = 1,
                 num_tokens: int = 4):
        self.lookup = PromptLookupDrafter(model, max_ngram, min_ngram, num_tokens)
        self.streams = StreamDrafter(model, tree)
        self.stream_logits_depth = self.streams.stream_logits_depth
        self.max_depth = max(self.streams.max_depth, num_tokens)

    def propose(self, history: List[int], budget: int) -> Draft:
        draft = self.streams.propose(history, budget)
        chain = self.lookup.chain(history, budget)
        if not chain:
            return draft
        # The streams' tokens are needed on the host to share the agreeing nodes.
        tokens = np.concatenate([[history[-1]], np.array(draft.tokens, dtype=np.int64)])
        tree = graft_chain(draft.tree.with_tokens(tokens), chain)
        if tree.size == draft.tree.size:
            return draft
        return Draft(tree, tree_rows(tree), mx.array(tree.tokens[1:].astype(np.int32)))

    def observe(self, out, node: int, stream_logits=None) -> None:
        self.streams.observe(out, node, stream_logits)
