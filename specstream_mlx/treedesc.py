"""Compact description of who sees whom in one forward, for fused attention.

The dense mask of a layer is ``(L, offset + L)``: every query row against the
cached prefix and the new rows. Its prefix part is all-visible (up to a
sliding window, which depends on positions only), and its new-row part has a
fixed structure (``masks.msa_block``), so a kernel needs far less:

``TreeDesc.table`` is ``(L, 3 + W)`` uint32, one line per query row, in the
forward's row order (main rows, then ``gamma`` stream rows per stream node):

* ``[0]`` position of the row relative to the cache length (the window test:
  key position ``p_k`` is visible from ``p_q`` iff ``p_q - p_k < window``; a
  prefix key ``t`` sits at ``t``, new row ``c`` at ``offset + table[c, 0]``);
* ``[1], [2]`` a range ``[start, start + length)`` of *stream* rows the row
  sees: stream ``(s, j)`` sees ``(s, 1..j)``, i.e. start ``M + s * gamma``,
  length ``j``; a main row sees no stream (length 0);
* ``[3 : 3 + W]`` bitmask over the ``M`` main rows (bit ``c & 31`` of word
  ``c >> 5``): ancestors-or-self of the row's node.

Keys visible to row ``r``: prefix keys (window permitting) + main rows whose
bit is set + its stream range (window permitting). Rows need not be in depth
order. ``visibility_block`` / ``dense_mask`` decode a description back to the
dense form; tests check they reproduce ``masks.msa_block`` / ``build_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .masks import Rows, row_positions

POS, STREAM_START, STREAM_LEN, WORDS = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class TreeDesc:
    """Visibility among the new rows of one layer group.

    Attributes:
        table: ``(L, 3 + W)`` uint32 row table (module docstring).
        n_main: ``M``, the rows covered by the bitmask (main rows).
        is_chain: the rows are plain consecutive tokens without streams, for
            which the reference has fast paths (no array mask).
    """

    table: np.ndarray
    n_main: int
    is_chain: bool = False

    @property
    def size(self) -> int:
        return int(self.table.shape[0])

    @property
    def words(self) -> int:
        return int(self.table.shape[1]) - WORDS

    @property
    def positions(self) -> np.ndarray:
        return self.table[:, POS].astype(np.int64)


def pack_bits(visible: np.ndarray) -> np.ndarray:
    """``(R, M)`` bool -> ``(R, max(1, ceil(M / 32)))`` uint32 words, bit ``c & 31`` of word ``c >> 5``."""
    r, m = visible.shape
    words = max(1, -(-m // 32))
    padded = np.zeros((r, words * 32), dtype=np.uint64)
    padded[:, :m] = visible
    weights = np.left_shift(np.uint64(1), np.arange(32, dtype=np.uint64))
    return (padded.reshape(r, words, 32) * weights).sum(axis=2).astype(np.uint32)


def unpack_bits(words: np.ndarray, m: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``(R, W)`` uint32 -> ``(R, m)`` bool."""
    shifts = np.arange(32, dtype=np.uint32)
    bits = (words[:, :, None] >> shifts) & np.uint32(1)  # (R, W, 32)
    return bits.reshape(words.shape[0], -1)[:, :m].astype(bool)


def describe(rows: Rows, gamma: int, with_streams: bool) -> TreeDesc:
    """The compact description of a forward's rows (pure function of ``rows``).

    Args:
        rows: structure of the main rows.
        gamma: streams per stream node.
        with_streams: the layer group carries stream rows (multi-stream
            layers); otherwise only the ``M`` main rows exist.

    Returns:
        A ``TreeDesc`` whose decoded block equals ``masks.msa_block(rows,
        gamma)`` (``with_streams``) or ``rows.ancestors``, and whose
        positions equal ``masks.row_positions(rows, gamma, with_streams)``.
    """
    m = rows.size
    nodes = np.asarray(rows.stream_nodes, dtype=np.int64) if with_streams else np.zeros(0, np.int64)
    if np.unique(nodes).shape[0] != nodes.shape[0]:
        raise ValueError(f"stream nodes must be distinct, got {nodes.tolist()}")
    if nodes.size and (nodes.min() < 0 or nodes.max() >= m):
        raise ValueError(f"stream nodes {nodes.tolist()} out of range for {m} rows")
    s = nodes.shape[0]
    size = m + s * gamma
    ancestors = np.asarray(rows.ancestors, dtype=bool)
    main_words = pack_bits(ancestors)  # (M, W)
    table = np.zeros((size, WORDS + main_words.shape[1]), dtype=np.uint32)
    table[:, POS] = row_positions(rows, gamma, with_streams=bool(s))
    table[:m, WORDS:] = main_words
    if s:
        starts = m + np.arange(s) * gamma  # (S,)
        stream_rows = slice(m, size)
        table[stream_rows, WORDS:] = np.repeat(main_words[nodes], gamma, axis=0)
        table[stream_rows, STREAM_START] = np.repeat(starts, gamma)
        table[stream_rows, STREAM_LEN] = np.tile(np.arange(1, gamma + 1), s)
    return TreeDesc(table=table, n_main=m, is_chain=bool(rows.is_chain) and s == 0)


def visibility_block(desc: TreeDesc) -> np.ndarray:
    """``(L, L)`` bool visibility among the new rows (decoded from ``desc``)."""
    size, m = desc.size, desc.n_main
    block = np.zeros((size, size), dtype=bool)
    block[:, :m] = unpack_bits(desc.table[:, WORDS:], m)
    cols = np.arange(size)[None, :]
    start = desc.table[:, STREAM_START].astype(np.int64)[:, None]
    length = desc.table[:, STREAM_LEN].astype(np.int64)[:, None]
    block |= (cols >= start) & (cols < start + length)
    return block


def dense_mask(desc: TreeDesc, offset: int, window: Optional[int] = None) -> np.ndarray:
    """``(L, offset + L)`` bool mask equal to what ``masks.build_mask`` means.

    Window semantics as ``build_mask``: key at ``p_k`` visible from ``p_q``
    iff ``p_q - p_k < window`` (absolute positions).
    """
    size = desc.size
    full = np.concatenate([np.ones((size, offset), dtype=bool), visibility_block(desc)], axis=1)
    if window is not None:
        q_pos = desc.positions[:, None] + offset
        k_pos = np.concatenate([np.arange(offset), desc.positions + offset])[None, :]
        full &= (q_pos - k_pos) < window
    return full
