"""Verification rules: which drafted tokens the model accepts.

Greedy: ``accept_greedy`` walks the tree along the model's argmax. Sampling:
the target distribution (mlx-lm's temperature / top-p / min-p / top-k
semantics) and tree rejection sampling, which keeps the output distribution
exactly the model's.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .tree import Tree


class SamplingError(ValueError):
    """A sampling setting out of range.

    Attributes:
        field: the ``SamplingParams`` field at fault (``temp``, ``top_p``,
            ``top_k`` or ``min_p``), so a caller can name its own parameter.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings with mlx-lm's meaning: the one object every decode
    path takes (``stream_generate``, the server's requests, ``decode``, the
    Core ML host loop).

    What "off" means (``mlx_lm.sample_utils.make_sampler``'s rule):

    * ``temp == 0``: greedy (argmax); the filters are then unused.
    * ``top_p``: filters only when ``0 < top_p < 1``; both ``0`` and ``1`` are
      off, and ``0`` is stored as ``1.0``, so ``top_p == 1.0`` is the one
      "off" value after construction (OpenAI's and mlx-lm's CLI default).
    * ``top_k``: ``0`` is off (``top_k >= vocabulary size`` keeps every token,
      the same thing).
    * ``min_p``: ``0`` is off.

    This class is the only place that validates and normalises; everything
    downstream tests ``top_p < 1``, ``top_k > 0``, ``min_p > 0``.

    Raises:
        SamplingError: (a ``ValueError``) a negative or non-finite
            temperature, or a filter out of range.
    """

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        temp, top_p, min_p = (_real(self, name) for name in ("temp", "top_p", "min_p"))
        try:
            top_k = operator.index(self.top_k)
        except TypeError:
            raise SamplingError("top_k", f"top-k must be an integer, got {self.top_k!r}") from None
        if not (temp >= 0 and math.isfinite(temp)):
            raise SamplingError("temp", f"temperature must be a finite number >= 0, got {temp}")
        if not 0 <= top_p <= 1:
            raise SamplingError("top_p", f"top-p must be in [0, 1] (0 or 1: off), got {top_p}")
        if top_k < 0:
            raise SamplingError("top_k", f"top-k must be >= 0 (0: off), got {top_k}")
        if not 0 <= min_p <= 1:
            raise SamplingError("min_p", f"min-p must be in [0, 1] (0: off), got {min_p}")
        object.__setattr__(self, "temp", temp)
        object.__setattr__(self, "top_p", 1.0 if top_p == 0 else top_p)  # the one "off" value
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "min_p", min_p)

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def _real(params: SamplingParams, name: str) -> float:
    value = getattr(params, name)
    try:
        return float(value)
    except (TypeError, ValueError):
        label = "temperature" if name == "temp" else name.replace("_", "-")
        raise SamplingError(name, f"{label} must be a number, got {value!r}") from None


def target_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits whose softmax is the distribution mlx-lm's sampler draws from.

    mlx-lm's sampler filters log-probabilities (top-p, then min-p, then top-k;
    filtered tokens become ``-inf``) and samples ``categorical(logprobs / temp)``.
    The Core ML host loop (``coreml.host.target_probs``) and the Swift app
    (``Sampling.probabilities``) apply the same steps in the same order.

    Args:
        logits: ``(..., V)`` raw logits.
        params: sampling settings (``temp > 0``).

    Returns:
        ``(..., V)`` float32 logits; ``softmax`` of them is the target ``p``.
    """
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:  # top_k >= V keeps every token
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs * (1.0 / params.temp)


def accept_greedy(tree: Tree, argmax: np.ndarray) -> list[int]:
    """Longest path of drafts that greedy decoding would have produced.

    Starting at the root, move to the child whose token equals the argmax of the
    current node's main logits; siblings hold distinct tokens, so at most one
    child matches and the path is unique.

    Args:
        tree: tree with tokens.
        argmax: ``(N,)`` argmax of each node's main-stream logits.

    Returns:
        Node indices of the accepted path, starting with the root (0).
    """
    assert tree.tokens is not None, "tree needs tokens"
    path = [0]
    while True:
        node = path[-1]
        want = int(argmax[node])
        nxt = next((c for c in tree.children[node] if int(tree.tokens[c]) == want), None)
        if nxt is None:
            return path
        path.append(nxt)


def accept_sampling(
    tree: Tree, child_probs: np.ndarray, uniforms: np.ndarray
) -> tuple[list[int], list[int]]:
    """Tree rejection sampling with deterministic (top-k) drafts.

    At node ``u`` with target distribution ``p_u`` the children ``c_1..c_m``
    (distinct tokens, best draft first) are tried in turn. The draft
    distribution of a deterministic draft is one-hot, so the usual rule
    ``accept with min(1, p(c) / q(c))`` becomes ``accept with p'(c)``, where
    ``p'`` is ``p_u`` with the already rejected children removed and
    renormalised: ``p'(c_i) = p_u(c_i) / (1 - sum_{l<i} p_u(c_l))``. On
    acceptance the walk moves to ``c_i``. If every child is rejected, the next
    token is drawn from ``p_u`` with all children removed (renormalised).

    Why this is exact: the chance that ``c_i`` is emitted is
    ``prod_{l<i}(1 - p'(c_l)) * p'(c_i) = p_u(c_i)`` (the product telescopes to
    ``1 - sum_{l<i} p_u(c_l)``), and any other token ``x`` is emitted with
    ``(1 - sum_l p_u(c_l)) * p_u(x) / (1 - sum_l p_u(c_l)) = p_u(x)``. So every
    emitted token has exactly the model's distribution given the accepted path.

    Args:
        tree: tree with tokens.
        child_probs: ``(N,)``, ``p_{parent(i)}(token_i)`` under the target
            distribution (entry 0 unused).
        uniforms: ``(N,)`` independent U(0, 1) draws (entry 0 unused).

    Returns:
        ``(path, excluded)``: accepted node indices from the root, and the
        tokens to remove from the last node's distribution before drawing the
        next token (its rejected children; empty when it has none).
    """
    assert tree.tokens is not None, "tree needs tokens"
    path = [0]
    while True:
        node = path[-1]
        remaining = 1.0  # target mass not yet rejected at this node
        rejected: list[int] = []
        moved = False
        for child in tree.children[node]:
            p = float(child_probs[child])
            if remaining > 0 and uniforms[child] * remaining < p:
                path.append(child)
                moved = True
                break
            remaining -= p
            rejected.append(int(tree.tokens[child]))
        if not moved:
            return path, rejected
