"""Attention masks for one forward: tree rows and multi-stream (MSA) rows.

Row layout of a forward (queries, in this order):

* ``M`` main rows (the tree nodes, or a prefill chunk, or one decode token);
* in the top ``Ns`` layers only, ``S * gamma`` stream rows: stream ``j`` of
  main row ``stream_nodes[s]`` sits at ``M + s * gamma + (j - 1)``.

Keys are the committed cache prefix (``offset`` rows) followed by the same rows.
Masks are boolean, ``True`` = may attend (``mx.fast.scaled_dot_product_attention``
accepts them directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from .tree import Tree


@dataclass(frozen=True, eq=False)
class Rows:
    """Structure of the main rows of one forward.

    Attributes:
        depth: ``(M,)`` position of each row relative to the cache length.
        ancestors: ``(M, M)`` bool, ``ancestors[i, k]``: row ``i`` may see row
            ``k`` (ancestor-or-self; lower-triangular for a chain).
        stream_nodes: ``(S,)`` rows that get ``gamma`` stream rows in the
            multi-stream layers.
        is_chain: rows are consecutive tokens (prefill or plain decoding).
    """

    depth: np.ndarray
    ancestors: np.ndarray
    stream_nodes: np.ndarray
    is_chain: bool = False

    @property
    def size(self) -> int:
        return int(self.depth.shape[0])


def chain_rows(n: int, stream_nodes: Optional[np.ndarray] = None) -> Rows:
    """Rows of ``n`` consecutive tokens (a prefill chunk or one decode step)."""
    nodes = np.zeros((0,), np.int64) if stream_nodes is None else np.asarray(stream_nodes, np.int64)
    return Rows(
        depth=np.arange(n, dtype=np.int64),
        ancestors=np.tril(np.ones((n, n), dtype=bool)),
        stream_nodes=nodes,
        is_chain=True,
    )


def msa_block(rows: Rows, gamma: int) -> np.ndarray:
    """Visibility among the rows of a multi-stream layer, cache excluded.

    * main ``i`` sees main ``k`` iff ``k`` is ``i`` or an ancestor of ``i``,
      and never a stream row: the main stream is ordinary causal attention
      in both modes (the paper's MSA), so a stream changes no main logit;
    * stream ``(i, j)`` sees the main rows ``i`` sees, and streams ``(i, 1..j)``.

    Returns:
        ``(L, L)`` bool with ``L = M + S * gamma``.
    """
    m, s = rows.size, rows.stream_nodes.shape[0]
    size = m + s * gamma
    block = np.zeros((size, size), dtype=bool)
    block[:m, :m] = rows.ancestors
    own = np.tril(np.ones((gamma, gamma), dtype=bool))  # (gamma, gamma): j' <= j
    for slot, node in enumerate(rows.stream_nodes):
        lo = m + slot * gamma
        block[lo : lo + gamma, :m] = rows.ancestors[node]
        block[lo : lo + gamma, lo : lo + gamma] = own
    return block


def row_positions(rows: Rows, gamma: int, with_streams: bool) -> np.ndarray:
    """Position offsets (relative to the cache length) of every query row.

    Stream ``(i, j)`` stands at ``depth_i + j``: the slot of the token whose
    successor it guesses (docs/design.md, "RoPE positions of stream rows").
    """
    if not with_streams or rows.stream_nodes.shape[0] == 0:
        return rows.depth
    streams = rows.depth[rows.stream_nodes][:, None] + np.arange(1, gamma + 1)[None, :]
    return np.concatenate([rows.depth, streams.reshape(-1)])


MaskLike = Union[None, str, mx.array]


def within_window(visible: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                  window: Optional[int]) -> np.ndarray:
    """``visible`` with keys outside a sliding window hidden.

    Args:
        visible: ``(Lq, Lk)`` bool.
        q_pos, k_pos: ``(Lq,)`` and ``(Lk,)`` absolute positions.
        window: a key at ``p_k`` stays visible to a query at ``p_q`` only if
            ``p_q - p_k < window``; ``None`` keeps everything.
    """
    if window is None:
        return visible
    return visible & ((q_pos[:, None] - k_pos[None, :]) < window)


def build_mask(
    block: np.ndarray,
    offset: int,
    positions: np.ndarray,
    window: Optional[int] = None,
    is_chain: bool = False,
) -> MaskLike:
    """Full ``(L, offset + L)`` mask for one layer group.

    Args:
        block: ``(L, L)`` visibility among the new rows (``msa_block`` or the
            ancestor matrix).
        offset: committed cache length.
        positions: ``(L,)`` row positions relative to ``offset``.
        window: sliding-window size of the layer (a key at position ``p_k`` is
            visible to a query at ``p_q`` only if ``p_q - p_k < window``).
        is_chain: ``block`` is plain causal, so the fast paths apply.

    Returns:
        ``None`` (one row, everything visible), ``"causal"``, or a bool array.
    """
    size = block.shape[0]
    window_bites = window is not None and int(positions.max()) + offset >= window
    if is_chain and not window_bites:
        return None if size == 1 else "causal"
    if not window_bites:
        tree = mx.array(block)
        if offset == 0:
            return tree
        return mx.concatenate([mx.ones((size, offset), dtype=mx.bool_), tree], axis=1)
    full = np.concatenate([np.ones((size, offset), dtype=bool), block], axis=1)
    k_pos = np.concatenate([np.arange(offset), positions + offset])
    return mx.array(within_window(full, positions + offset, k_pos, window))


def tree_rows(tree: "Tree", streams: bool = True) -> Rows:
    """Rows of a tree forward: every node drafts through its streams (``streams``), or
    none does (drafts from elsewhere, e.g. Medusa heads on the main rows)."""
    return Rows(
        depth=tree.depth,
        ancestors=tree.mask,
        stream_nodes=np.arange(tree.size if streams else 0, dtype=np.int64),
    )
