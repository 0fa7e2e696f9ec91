"""Shared helpers for the fused-kernel tests: random trees, the reference, emulator builds."""

from __future__ import annotations

import functools
import unittest.mock
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from specstream_mlx.kernels_metal import emulator, launch
from specstream_mlx.masks import Rows, build_mask, msa_block, row_positions
from specstream_mlx.tree import ancestor_mask
from specstream_mlx.treedesc import TreeDesc, describe

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Tolerance of the kernel's output against a float32 reference, by dtype
# (float32 accumulation; the output is rounded once to the dtype).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def random_parents(n: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    """Parent indices of a random tree of ``n`` nodes rooted at 0.

    With ``shuffle`` the nodes (other than the root) are permuted, so rows are
    not in depth order and parents may come after their children.
    """
    parents = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        parents[i] = rng.integers(0, i)
    if not shuffle or n < 3:
        return parents
    perm = np.concatenate([[0], 1 + rng.permutation(n - 1)])  # new index -> old index
    old_to_new = np.empty(n, dtype=np.int64)
    old_to_new[perm] = np.arange(n)
    shuffled = parents[perm]
    return np.where(shuffled >= 0, old_to_new[np.maximum(shuffled, 0)], -1)


def tree_rows(parents: np.ndarray, stream_nodes: np.ndarray) -> Rows:
    """``masks.Rows`` of a tree given by parent indices."""
    anc = ancestor_mask(parents)
    return Rows(depth=anc.sum(axis=1).astype(np.int64) - 1, ancestors=anc,
                stream_nodes=np.asarray(stream_nodes, dtype=np.int64))


@dataclass
class Case:
    """One fused-attention problem (a layer group of one forward)."""

    name: str
    dtype: str
    head_dim: int
    nodes: int
    prefix: int
    group: int  # query heads per kv head
    kv_heads: int = 1
    gamma: int = 3
    streams: str = "all"  # all | some | none
    window: Optional[int] = None
    shuffle: bool = False
    simd_groups: int = 1
    slots: int = 4
    seed: int = 0

    @property
    def variant(self) -> emulator.Variant:
        return emulator.Variant(self.dtype, self.head_dim, self.simd_groups, self.slots)

    def rows(self) -> tuple:
        rng = np.random.default_rng(self.seed)
        parents = random_parents(self.nodes, rng, self.shuffle)
        if self.streams == "all":
            nodes = np.arange(self.nodes)
        elif self.streams == "some":
            nodes = np.sort(rng.choice(self.nodes, size=max(1, self.nodes // 2), replace=False))
        else:
            nodes = np.zeros(0, np.int64)
        rows = tree_rows(parents, nodes)
        with_streams = nodes.size > 0
        return rows, with_streams

    def problem(self):
        """(q, k_buf, v_buf, desc, dense mask) with NaN in the unused buffer rows."""
        rows, with_streams = self.rows()
        desc = describe(rows, self.gamma, with_streams)
        block = msa_block(rows, self.gamma) if with_streams else rows.ancestors
        positions = row_positions(rows, self.gamma, with_streams)
        mask = build_mask(block, self.prefix, positions, self.window, False)
        size = desc.size
        rng = np.random.default_rng(self.seed + 1)
        heads = self.kv_heads * self.group
        cap = self.prefix + size + 5
        dtype = DTYPES[self.dtype]
        q = rng.normal(size=(1, heads, size, self.head_dim)).astype(np.float32)
        k = rng.normal(size=(1, self.kv_heads, cap, self.head_dim)).astype(np.float32)
        v = rng.normal(size=(1, self.kv_heads, cap, self.head_dim)).astype(np.float32)
        k[:, :, self.prefix + size:] = np.nan  # never read: beyond offset + L
        v[:, :, self.prefix + size:] = np.nan
        return (mx.array(q).astype(dtype), mx.array(k).astype(dtype), mx.array(v).astype(dtype),
                desc, mask)

    def plan(self, q, k, v, desc: TreeDesc) -> launch.LaunchPlan:
        return launch.make_plan(q, k, v, mx.array(desc.table), self.prefix, desc.n_main,
                                self.window, self.scale, max_threads=self.simd_groups * 32,
                                simd_groups=self.simd_groups, slots=self.slots)

    @property
    def scale(self) -> float:
        return 1.0 / float(np.sqrt(self.head_dim))


def reference(q, k, v, prefix: int, mask, scale: float, dtype=mx.float32) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` with the dense mask, in ``dtype``."""
    n_keys = prefix + q.shape[2]
    kk, vv = k[:, :, :n_keys], v[:, :, :n_keys]
    return mx.fast.scaled_dot_product_attention(
        q.astype(dtype), kk.astype(dtype), vv.astype(dtype), scale=scale, mask=mask
    )


def max_error(out: mx.array, ref: mx.array) -> float:
    a = np.array(out.astype(mx.float32))
    b = np.array(ref.astype(mx.float32))
    assert not np.isnan(a).any(), "kernel left NaN in its output (unwritten or read out of range)"
    return float(np.abs(a - b).max())


# Every variant the tests run, so each flavour is compiled once per session
# (and cached across sessions by content hash).
def _grid_cases() -> list:
    dims = (64, 96, 128, 256)
    launches = [(1, 4), (2, 4), (4, 2), (2, 1), (1, 2), (2, 2)]
    cases = []
    i = 0
    for dtype in DTYPES:
        for dim in dims:
            nsimd, sps = launches[i % len(launches)]
            cases.append(Case(
                name=f"{dtype}-d{dim}", dtype=dtype, head_dim=dim, nodes=2 + (i * 5) % 9,
                prefix=(0, 1, 37, 70)[i % 4], group=(1, 2, 4)[i % 3], kv_heads=1 + i % 2,
                gamma=1 + i % 4, streams=("all", "some", "none")[i % 3],
                window=(None, None, 24)[i % 3], shuffle=i % 2 == 0,
                simd_groups=nsimd, slots=sps, seed=100 + i,
            ))
            i += 1
    return cases


GRID_CASES = _grid_cases()
EDGE_CASES = [
    Case("prefix0", "float32", 64, nodes=6, prefix=0, group=2, shuffle=True, simd_groups=2),
    Case("one-node", "float32", 64, nodes=1, prefix=9, group=2, streams="none"),
    Case("one-node-streams", "float16", 128, nodes=1, prefix=40, group=1, gamma=4),
    Case("one-node-prefix0", "bfloat16", 64, nodes=1, prefix=0, group=4, streams="none"),
    Case("not-depth-order", "float32", 96, nodes=12, prefix=20, group=2, shuffle=True,
         streams="some", simd_groups=2, slots=2, seed=7),
    Case("window-bites", "float32", 64, nodes=7, prefix=50, group=2, window=5, shuffle=True,
         simd_groups=2),
    Case("gqa8", "float16", 64, nodes=5, prefix=45, group=8, kv_heads=2, slots=4, seed=3),
    Case("two-words", "float32", 64, nodes=40, prefix=3, group=1, streams="some", gamma=2,
         simd_groups=2, seed=11),
    Case("eight-simd", "bfloat16", 128, nodes=4, prefix=300, group=2, simd_groups=8, seed=5),
]
ALL_CASES = GRID_CASES + EDGE_CASES
MODEL_VARIANTS = [emulator.Variant("float32", 64, n, 4) for n in (1, 2)]
VARIANTS = sorted({c.variant for c in ALL_CASES} | set(MODEL_VARIANTS), key=lambda v: v.name)


@functools.lru_cache(maxsize=None)
def get_emulator(flavour: str) -> emulator.Emulator:
    """The compiled emulator of ``flavour`` with every test variant (built once)."""
    return emulator.Emulator(flavour, VARIANTS)


class FakeDevice:
    """A stand-in for ``mx.fast.metal_kernel`` on the CPU: the launch path without a Mac.

    Installed (``install``), ``launch.backend()`` says ``"metal"`` and every kernel
    ``launch`` makes comes from ``factory``. As with MLX's JIT, a template
    instantiation (variant) is compiled when its first launch is evaluated: here
    the ``source`` handed to the factory is compiled for that variant under the
    shim (``g++ -fsyntax-only``). A variant that does not compile gives outputs
    whose evaluation raises, lazily, as a device's would; the others run on the
    test emulator build (``get_emulator``, the shipped source).

    Attributes:
        launches: the ``emulator.Variant`` of every launch that ran, in order.
        broken: variants whose compile failed, with the compiler's message.
    """

    def __init__(self, flavour: str = "metal") -> None:
        self.flavour = flavour
        self.launches: list = []
        self.broken: dict = {}
        self._compiled: set = set()

    def install(self, monkeypatch, max_threads: int = 64) -> "FakeDevice":
        """Route ``launch`` to this device for one test (state of ``launch`` reset)."""
        monkeypatch.setattr(launch, "backend", lambda: self.flavour)
        monkeypatch.setattr(mx.fast, f"{self.flavour}_kernel", self.factory)
        monkeypatch.setattr(launch, "_kernels", {})
        monkeypatch.setattr(launch, "_limits", {})
        monkeypatch.setattr(launch, "_variants", {})
        monkeypatch.setenv(launch.LIMIT_ENV, str(max_threads))
        return self

    def factory(self, name, input_names, output_names, source, header="", **_):
        assert list(input_names) == list(emulator.INPUT_NAMES) and header
        return lambda **call: self._launch(source, **call)

    def _launch(self, source, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                **_):
        plan = launch.LaunchPlan(tuple(inputs), tuple(template), tuple(grid), tuple(threadgroup),
                                 tuple(output_shapes[0]), output_dtypes[0])
        variant = emulator.Variant.of(plan)
        if variant not in self._compiled and variant not in self.broken:
            try:
                with unittest.mock.patch.object(emulator, "kernel_source", lambda flavour: source):
                    emulator.syntax_check(self.flavour, [variant])
                self._compiled.add(variant)
            except RuntimeError as exc:
                self.broken[variant] = str(exc)
        if variant in self.broken:  # raises when evaluated, not here (like a JIT build error)
            poison = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu).sum()
            return [mx.zeros(plan.output_shape, dtype=plan.output_dtype) + poison.astype(plan.output_dtype)]
        self.launches.append(variant)
        return [get_emulator(self.flavour).run(plan)]
