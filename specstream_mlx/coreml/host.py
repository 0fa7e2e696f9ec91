"""The host side of the Core ML decode loop, in Python.

This is what ``apps/SpecStreamCoreML`` does in Swift, written against the same
interface (``interface.json``): build each call's inputs (padded rows, additive
mask over cache slots, pending commit), draft a tree from the last accepted
row's streams, verify (greedy, or tree rejection sampling) and commit the
accepted path. It runs against any backend with ``predict`` / ``reset``: the
traced PyTorch module on Linux (``TorchBackend``), the saved package on macOS
(``CoreMLBackend``). Verification reuses the runtime's own rules and
settings (``verify.accept_greedy``, ``verify.accept_sampling``,
``verify.SamplingParams``); the target distribution is ``target_probs``, a
numpy copy of ``verify.target_logits`` that the Swift code mirrors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..tree import Tree
from ..verify import SamplingParams, accept_greedy
from . import interface

INPUT_ROLES = tuple(interface.interface()["inputs"])


class ContextFull(ValueError):
    """The next call would write past the last cache slot."""


@dataclass(frozen=True)
class Layout:
    """What the host needs to know about a package (from its metadata).

    Attributes:
        gamma, max_context, commit_slots, vocab_size: ``G``, ``C``, ``K``, ``V``.
        tree_sizes: enumerated row counts, ascending.
        trees: draft tree topology for each size.
        tree_default: default tree size.
        eos_token_ids: end-of-sequence ids.
    """

    gamma: int
    max_context: int
    commit_slots: int
    vocab_size: int
    tree_sizes: tuple
    trees: Dict[int, Tree] = field(repr=False)
    tree_default: int
    eos_token_ids: tuple = ()

    @classmethod
    def from_metadata(cls, meta: Dict[str, str]) -> "Layout":
        """Parse a package's ``specstream.*`` metadata (string values)."""

        def get(role):
            return meta[interface.meta_key(role)]

        trees = {}
        for size, spec in json.loads(get("trees")).items():
            trees[int(size)] = Tree(parents=np.array(spec["parents"], np.int64),
                                    depth=np.array(spec["depth"], np.int64),
                                    rank=np.array(spec["rank"], np.int64))
        eos = tuple(int(t) for t in get("eos_token_ids").split(",") if t)
        return cls(
            gamma=int(get("gamma")), max_context=int(get("max_context")),
            commit_slots=int(get("commit_slots")), vocab_size=int(get("vocab_size")),
            tree_sizes=tuple(int(s) for s in get("tree_sizes").split(",")), trees=trees,
            tree_default=int(get("tree_default")), eos_token_ids=eos,
        )


class TorchBackend:
    """The traced (or plain) ``StepModule`` as a backend."""

    def __init__(self, module) -> None:
        self.module = module

    def reset(self) -> None:
        import torch

        with torch.no_grad():
            getattr(self.module, interface.state_name("key_cache")).zero_()
            getattr(self.module, interface.state_name("value_cache")).zero_()

    def predict(self, inputs: Dict[str, np.ndarray]):
        import torch

        with torch.no_grad():
            args = [torch.from_numpy(inputs[interface.input_name(r)]) for r in INPUT_ROLES]
            main, streams = self.module(*args)
        return main[0].float().numpy(), streams[0].float().numpy()


class CoreMLBackend:
    """A loaded ``coremltools.models.MLModel`` with one state (macOS only)."""

    def __init__(self, mlmodel) -> None:
        self.model = mlmodel
        self.state = mlmodel.make_state()

    def reset(self) -> None:
        self.state = self.model.make_state()

    def predict(self, inputs: Dict[str, np.ndarray]):
        out = self.model.predict(inputs, state=self.state)
        main = np.asarray(out[interface.output_name("main_logits")], np.float32)
        streams = np.asarray(out[interface.output_name("stream_logits")], np.float32)
        return main[0], streams[0]


class Session:
    """Committed length, pending commit and input building for one conversation."""

    def __init__(self, backend, layout: Layout) -> None:
        self.backend, self.layout = backend, layout
        self.length = 0  # committed rows L
        self._pending: List[tuple] = []  # (src, dst) slot copies for the next call
        self._last_rows = 0
        backend.reset()

    def size_for(self, rows: int) -> int:
        """The smallest enumerated size that holds ``rows`` rows."""
        for size in self.layout.tree_sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest enumerated size {self.layout.tree_sizes[-1]}")

    def inputs(self, tokens: Sequence[int], depth: np.ndarray, visible: np.ndarray) -> Dict[str, np.ndarray]:
        """Inputs of one call: ``n`` rows at ``length + depth`` seeing ``visible`` ``(n, n)`` among them."""
        n, lay = len(tokens), self.layout
        size, start = self.size_for(n), self.length
        if start + size > lay.max_context:
            raise ContextFull(f"{start} committed + {size} rows exceed the {lay.max_context} cache slots")
        hidden, shown = interface.mask_value("hidden"), interface.mask_value("visible")
        ids = np.zeros((1, size), np.int32)
        ids[0, :n] = tokens
        positions = (start + np.arange(size)).astype(np.int32)[None]
        positions[0, :n] = start + np.asarray(depth)
        mask = np.full((size, lay.max_context), hidden, np.float16)
        mask[:n, :start] = shown
        mask[:n, start : start + n] = np.where(visible, shown, hidden)
        pad = np.arange(n, size)
        mask[pad, start + pad] = shown  # padding rows see their own slot only
        src = np.zeros(lay.commit_slots, np.int32)
        dst = np.zeros(lay.commit_slots, np.int32)
        for k, (s, d) in enumerate(self._pending):
            src[k], dst[k] = s, d
        return {
            interface.input_name("input_ids"): ids,
            interface.input_name("position_ids"): positions,
            interface.input_name("attention_mask"): mask[None, None],
            interface.input_name("write_start"): np.array([start], np.int32),
            interface.input_name("commit_src"): src,
            interface.input_name("commit_dst"): dst,
        }

    def call(self, tokens: Sequence[int], depth: np.ndarray, visible: np.ndarray):
        """Run one call; returns ``(main (n, V), streams (n, G, V))`` for the real rows."""
        inputs = self.inputs(tokens, depth, visible)
        self._pending, self._last_rows = [], len(tokens)
        main, streams = self.backend.predict(inputs)
        return main[: len(tokens)], streams[: len(tokens)]

    def commit(self, rows: Sequence[int]) -> None:
        """Keep rows ``rows`` (increasing indices into the last call's rows), in order.

        The copies are applied at the start of the next call; identity copies are skipped.
        """
        rows = [int(r) for r in rows]
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and rows[-1] >= self._last_rows):
            raise ValueError(f"commit rows must increase within the last call's rows, got {rows}")
        copies = [(self.length + r, self.length + k) for k, r in enumerate(rows) if r != k]
        if len(copies) > self.layout.commit_slots:
            raise ValueError(f"{len(copies)} copies exceed the {self.layout.commit_slots} commit slots")
        self._pending = copies
        self.length += len(rows)


def target_probs(logits: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """Target distribution of each row, in numpy. ``(..., V) -> (..., V)``.

    The same steps, in the same order, as ``verify.target_logits`` (mlx-lm's
    sampler), which the Swift app's ``Sampling.probabilities`` copies too:
    log-softmax, then top-p, then min-p, then top-k (filtered tokens get
    ``-inf``), then divide by the temperature and softmax. What "off" means is
    ``SamplingParams``' rule (``top_p == 1``, ``min_p == 0``, ``top_k == 0``).
    tests/test_coreml_step.py checks this against ``verify.target_logits``.
    """
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    x = x - (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))  # log-probabilities
    if sampling.top_p < 1:
        # mlx_lm.sample_utils.apply_top_p: keep each token whose strictly better
        # tokens hold less than top_p of the mass (ties at the threshold stay).
        ascending = np.sort(x, axis=-1)
        p = np.exp(ascending)
        above = np.cumsum(p[..., ::-1], axis=-1)[..., ::-1] - p  # mass after each position
        dropped = (above >= sampling.top_p * p.sum(-1, keepdims=True)).sum(-1, keepdims=True)
        x = np.where(x < np.take_along_axis(ascending, dropped, -1), -np.inf, x)
    if sampling.min_p > 0:
        # apply_min_p: drop tokens below min_p times the best token's probability.
        x = np.where(x < x.max(-1, keepdims=True) + np.log(sampling.min_p), -np.inf, x)
    if 0 < sampling.top_k < x.shape[-1]:
        # apply_top_k: keep the top_k best (ties at the k-th all stay).
        kth = np.sort(x, axis=-1)[..., -sampling.top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    x = x / sampling.temp
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def draft_tokens(streams: np.ndarray, tree: Tree) -> np.ndarray:
    """Tokens of nodes ``1..n-1``: the ``rank``-th best of stream ``depth``. ``(G, V) -> (n-1,)``."""
    depth, rank = tree.depth[1:], tree.rank[1:]
    if depth.size == 0:
        return np.zeros(0, np.int64)
    k = int(rank.max()) + 1
    top = np.argsort(-streams[: int(depth.max())], axis=-1, kind="stable")[:, :k]  # (depth, k)
    return top[depth - 1, rank]


def generate(backend, layout: Layout, prompt: Sequence[int], max_tokens: int,
             tree_size: Optional[int] = None, sampling: SamplingParams = SamplingParams(),
             seed: int = 0, stop_ids: Sequence[int] = ()) -> dict:
    """Decode with the package's interface; returns tokens and statistics.

    Args:
        backend: ``TorchBackend`` or ``CoreMLBackend``.
        layout: the package's layout.
        prompt: prompt token ids (non-empty).
        max_tokens: tokens to emit (the output is cut to this many).
        tree_size: one of ``layout.tree_sizes`` (default ``layout.tree_default``).
        sampling: ``verify.SamplingParams``; greedy by default.
        seed: for sampling. stop_ids: stop after emitting one of these.

    Returns:
        ``{"tokens", "forwards", "accepted", "finish"}``.
    """
    from ..verify import accept_sampling

    session, rng = Session(backend, layout), np.random.default_rng(seed)
    tree = layout.trees[tree_size or layout.tree_default]
    chunk = layout.tree_sizes[-1]
    for begin in range(0, len(prompt), chunk):
        part = list(prompt[begin : begin + chunk])
        n = len(part)
        main, streams = session.call(part, np.arange(n), np.tril(np.ones((n, n), bool)))
        session.commit(range(n))
    last_main, last_streams = main[-1], streams[-1]

    def choose(row, excluded=()):
        if sampling.greedy:
            return int(np.argmax(row))
        p = target_probs(row, sampling)
        p[list(excluded)] = 0.0
        return int(rng.choice(p.size, p=p / p.sum()))

    tokens, accepted, forwards, finish = [choose(last_main)], [], 0, "length"
    stops = set(stop_ids)
    while len(tokens) < max_tokens and not stops.intersection(tokens):
        nodes = np.concatenate([[tokens[-1]], draft_tokens(last_streams, tree)]).astype(np.int64)
        try:
            main, streams = session.call(nodes, tree.depth, tree.mask)
        except ContextFull:
            finish = "context"
            break
        forwards += 1
        drafted = tree.with_tokens(nodes)
        if sampling.greedy:
            path = accept_greedy(drafted, main.argmax(-1))
            excluded = ()
        else:
            probs = target_probs(main, sampling)
            child = probs[np.maximum(tree.parents, 0), nodes]
            path, excluded = accept_sampling(drafted, child, rng.random(tree.size))
        session.commit(path)
        tokens += [int(t) for t in nodes[path[1:]]] + [choose(main[path[-1]], excluded)]
        accepted.append(len(path) - 1)
        last_streams = streams[path[-1]]
    hits = [i for i, t in enumerate(tokens) if t in stops]
    if hits and hits[0] < max_tokens:
        tokens, finish = tokens[: hits[0] + 1], "stop"
    return {"tokens": tokens[:max_tokens], "forwards": forwards, "accepted": accepted, "finish": finish}
