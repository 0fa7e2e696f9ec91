"""The fused tree-attention kernel, Metal and CUDA flavours, run on the CPU under the shim.

Each case builds a random tree (``kernel_cases``), derives its compact
description, runs the kernel source exactly as MLX would receive it (compiled
as C++ with one OS thread per SIMD lane), and compares with
``mx.fast.scaled_dot_product_attention`` under the runtime's own dense mask.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from .kernel_cases import ALL_CASES, EDGE_CASES, TOLERANCE, get_emulator, max_error, reference
from specstream_mlx.kernels_metal import emulator, kernel_source, launch, sources

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="needs a C++ compiler (g++)")

FLAVOURS = ("metal", "cuda")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_emulated_kernel_matches_reference(flavour, case):
    q, k, v, desc, mask = case.problem()
    out = get_emulator(flavour).run(case.plan(q, k, v, desc))
    assert out.shape == q.shape and out.dtype == q.dtype
    # Against a float32 reference from the same (rounded) inputs: dtype tolerance.
    ref32 = reference(q, k, v, case.prefix, mask, case.scale)
    assert max_error(out, ref32) <= TOLERANCE[case.dtype] * max(1.0, float(mx.abs(ref32).max()))
    # Against the reference path the runtime would take in that dtype.
    ref = reference(q, k, v, case.prefix, mask, case.scale, dtype=q.dtype)
    assert max_error(out, ref) <= 2 * TOLERANCE[case.dtype] * max(1.0, float(mx.abs(ref32).max()))


def test_cases_cover_the_issue_grid():
    """Every head dim x dtype, GQA > 1, prefix 0, 1-node trees, shuffled rows, windows."""
    combos = {(c.dtype, c.head_dim) for c in ALL_CASES}
    assert combos >= {(d, h) for d in TOLERANCE for h in launch.HEAD_DIMS}
    assert any(c.prefix == 0 for c in ALL_CASES) and any(c.nodes == 1 for c in ALL_CASES)
    assert any(c.shuffle and c.nodes > 3 for c in ALL_CASES)
    assert {c.group for c in ALL_CASES} >= {1, 2, 4, 8}
    assert any(c.window is not None for c in ALL_CASES)
    assert {c.simd_groups for c in ALL_CASES} >= {1, 2, 4, 8}


def test_shuffled_case_really_is_out_of_depth_order():
    case = next(c for c in EDGE_CASES if c.name == "not-depth-order")
    rows, _ = case.rows()
    assert (np.diff(rows.depth) < 0).any()


def test_wrong_visibility_is_caught():
    """The comparison has teeth: a kernel given a different tree disagrees."""
    case = next(c for c in EDGE_CASES if c.name == "prefix0")
    q, k, v, desc, mask = case.problem()
    table = desc.table.copy()
    table[-1, 3:] = 1  # last row now sees only the root
    plan = launch.make_plan(q, k, v, mx.array(table), case.prefix, desc.n_main, None, case.scale,
                            max_threads=64, simd_groups=case.simd_groups, slots=case.slots)
    out = get_emulator("metal").run(plan)
    assert max_error(out, reference(q, k, v, case.prefix, mask, case.scale)) > 1e-2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sources_compile_syntax_only(flavour):
    """CI check: every shipped (dtype, head dim) compiles under the shim."""
    emulator.syntax_check(flavour, emulator.shipped_variants())


def test_syntax_slip_fails_the_check(monkeypatch):
    broken = kernel_source("metal").replace("m_run[s] = m_new;", "m_run[s] = m_new")
    monkeypatch.setattr(sources, "kernel_source", lambda flavour: broken)
    monkeypatch.setattr(emulator, "kernel_source", lambda flavour: broken)
    with pytest.raises(RuntimeError, match="compiling the kernel"):
        emulator.syntax_check("metal", [emulator.Variant("float32", 64, 1, 4)])


def test_metal_attributes_are_exactly_the_thread_ids():
    """MLX adds an attribute parameter for every attribute name found in the source."""
    names = [n for n, _ in emulator.metal_attributes(kernel_source("metal"))]
    assert names == ["simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
                     "thread_index_in_threadgroup", "threadgroup_position_in_grid"]


def test_no_shape_arguments_are_generated():
    """MLX adds ``<input>_shape/_strides/_ndim`` parameters when those names appear."""
    for flavour in FLAVOURS:
        text = kernel_source(flavour)
        for name in sources.INPUT_NAMES:
            for suffix in ("_shape", "_strides", "_ndim"):
                assert name + suffix not in text
