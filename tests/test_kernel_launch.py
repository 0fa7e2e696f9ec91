"""Launch planning, the threadgroup-limit query, variant checks, the sources, the shims.

Tests that depend on the backend hold on this CPU (no kernel) and on a Mac or a
CUDA GPU (the real kernel, checked against the reference on the kernel cases).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from .kernel_cases import EDGE_CASES, TOLERANCE, FakeDevice, max_error, reference
from specstream_mlx.kernels_metal import emulator, launch, sources

HAS_DEVICE = launch.backend() is not None
needs_device = pytest.mark.skipif(not HAS_DEVICE, reason="no Metal or CUDA GPU here")


def _arrays(heads=4, kv_heads=2, rows=5, cap=40, dim=64, dtype=mx.float16):
    q = mx.zeros((1, heads, rows, dim), dtype=dtype)
    k = mx.zeros((1, kv_heads, cap, dim), dtype=dtype)
    table = mx.zeros((rows, 4), dtype=mx.uint32)
    return q, k, table


def test_plan_grid_and_params():
    q, k, table = _arrays()
    plan = launch.make_plan(q, k, k, table, offset=30, n_main=5, window=None, scale=0.5,
                            max_threads=1024, simd_groups=2, slots=4)
    # 5 rows x 2 heads per kv head = 10 slots -> 3 blocks of 4; 2 kv heads.
    assert plan.grid == (3 * 64, 2, 1) and plan.threadgroup == (64, 1, 1)
    assert np.array(plan.inputs[4]).tolist() == [30, 5, 40, 0, 4, 5, 2]
    assert plan.output_shape == (1, 4, 5, 64) and plan.output_dtype == mx.float16
    assert dict(plan.template) == {"T": mx.float16, "HEAD_DIM": 64, "NSIMD": 2, "SPS": 4}


def test_simd_groups_respect_the_limit_and_the_work():
    assert launch.simd_groups_for(n_keys=10, max_threads=1024) == 1
    assert launch.simd_groups_for(n_keys=4096, max_threads=1024) == launch.MAX_SIMD_GROUPS
    assert launch.simd_groups_for(n_keys=4096, max_threads=96) == 2  # 96 threads: 3 groups -> 2
    assert launch.simd_groups_for(n_keys=4096, max_threads=32) == 1
    q, k, table = _arrays(cap=5000)
    plan = launch.make_plan(q, k, k, table, 4000, 5, None, 1.0, max_threads=128)
    assert plan.threadgroup[0] <= 128


@pytest.mark.parametrize("change,match", [
    (dict(dim=80), "head dim"),
    (dict(heads=3), "split"),
    (dict(cap=12), "keys needed"),
    (dict(rows=300, cap=400), "at most"),
])
def test_plan_rejects_what_the_kernel_cannot_do(change, match):
    q, k, table = _arrays(**change)
    with pytest.raises(ValueError, match=match):
        launch.make_plan(q, k, k, table, 10, 1, None, 1.0)


def test_threadgroup_limit_read_from_the_launch_error(monkeypatch):
    """A device that allows 96 threads for this kernel: the probe learns it from MLX's error."""
    monkeypatch.setattr(launch, "_limits", {})
    monkeypatch.delenv(launch.LIMIT_ENV, raising=False)
    tried = []

    def probe(flavour, dtype, dim, nsimd, sps):
        tried.append(nsimd)
        if nsimd * 32 > 96:
            raise ValueError(f"Thread group size ({nsimd * 32}) is greater than  the maximum "
                             f"allowed threads per threadgroup (96).")

    assert launch.threadgroup_limit("metal", mx.float16, 128, 4, probe) == 64
    assert tried == [8, 2]
    assert launch.threadgroup_limit("metal", mx.float16, 128, 4, probe) == 64  # cached
    assert tried == [8, 2]


def test_threadgroup_limit_env_cap_and_other_errors(monkeypatch):
    monkeypatch.setattr(launch, "_limits", {})
    monkeypatch.setattr(launch, "_variants", {})
    monkeypatch.setenv(launch.LIMIT_ENV, "128")
    seen = []
    assert launch.threadgroup_limit("metal", mx.float32, 64, 4, lambda *a: seen.append(a[3])) == 128
    assert seen == [4]
    assert launch._variants == {("metal", "float32", 64, 4, 4): None}

    def broken(*args):
        seen.append(args[3])
        raise RuntimeError("Unable to build metal library from source")

    monkeypatch.setattr(launch, "_limits", {})
    seen.clear()
    with pytest.raises(launch.KernelUnavailable, match="any SIMD-group count.*metal library"):
        launch.threadgroup_limit("metal", mx.float32, 64, 4, broken)
    assert seen == [4, 2, 1]  # every SIMD-group count was tried, each failure remembered
    assert [k[3] for k, why in launch._variants.items() if why] == [4, 2, 1]
    with pytest.raises(launch.KernelUnavailable, match="metal library"):  # remembered
        launch.threadgroup_limit("metal", mx.float32, 64, 4, broken)
    assert seen == [4, 2, 1]


def test_a_variant_that_fails_is_skipped_by_the_limit(monkeypatch):
    """8 SIMD groups do not build (say, too much threadgroup memory): the limit drops to 4."""
    monkeypatch.setattr(launch, "_limits", {})
    monkeypatch.setattr(launch, "_variants", {})
    monkeypatch.delenv(launch.LIMIT_ENV, raising=False)

    def probe(flavour, dtype, dim, nsimd, sps):
        if nsimd == 8:
            raise RuntimeError("threadgroup memory exceeds the limit")

    assert launch.threadgroup_limit("metal", mx.float16, 256, 2, probe) == 128
    assert launch._variants == {("metal", "float16", 256, 8, 2): "RuntimeError: threadgroup "
                                "memory exceeds the limit", ("metal", "float16", 256, 4, 2): None}


def test_check_variant_probes_once_and_remembers(monkeypatch):
    monkeypatch.setattr(launch, "_variants", {})
    tried = []

    def probe(flavour, dtype, dim, nsimd, sps):
        tried.append(nsimd)
        if nsimd == 1:
            raise RuntimeError("Unable to build metal library from source\nerror: injected")

    for _ in range(3):
        launch.check_variant("metal", mx.bfloat16, 96, 2, 4, probe)
        with pytest.raises(launch.KernelUnavailable) as failed:
            launch.check_variant("metal", mx.bfloat16, 96, 1, 4, probe)
    assert tried == [2, 1]
    assert failed.value.variant == ("metal", "bfloat16", 96, 1, 4)
    assert str(failed.value).startswith("metal kernel bfloat16, head dim 96, 1 SIMD group(s), 4 slots: "
                                        "RuntimeError: Unable to build metal library")


def test_tree_attention_needs_a_backend():
    q, k, table = _arrays()
    if not HAS_DEVICE:
        with pytest.raises(RuntimeError, match="reference"):
            launch.tree_attention(q, k, k, table, 10, 5, None, 1.0)
        return
    table = mx.array(np.tile(np.array([[0, 0, 0, 0b11111]], np.uint32), (5, 1)))
    out = launch.tree_attention(q, k, k, table, 10, 5, None, 1.0)
    assert out.shape == q.shape and not np.isnan(np.array(out.astype(mx.float32))).any()


DEVICE_CASES = [c for c in EDGE_CASES if c.name in ("prefix0", "window-bites", "gqa8", "two-words")]


@needs_device
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.name)
def test_device_kernel_matches_reference(case):
    """The real kernel (Metal or CUDA) on the kernel cases, in the cases' launch shape and in
    the shape ``tree_attention`` picks."""
    _device_matches_reference(case, launch.backend())


@pytest.mark.skipif(emulator.compiler() is None, reason="needs a C++ compiler (g++)")
@pytest.mark.parametrize("case", DEVICE_CASES, ids=lambda c: c.name)
def test_launch_path_matches_reference_on_the_emulated_device(case, monkeypatch):
    """The same check through ``run_plan`` / ``tree_attention`` with the CPU emulator standing
    in for ``mx.fast.metal_kernel`` (what ``test_device_kernel_matches_reference`` runs)."""
    device = FakeDevice().install(monkeypatch, max_threads=case.simd_groups * 32)
    _device_matches_reference(case, "metal")
    assert device.launches and not device.broken


def _device_matches_reference(case, flavour):
    q, k, v, desc, mask = case.problem()
    ref32 = reference(q, k, v, case.prefix, mask, case.scale)
    bound = TOLERANCE[case.dtype] * max(1.0, float(mx.abs(ref32).max()))
    out = launch.run_plan(case.plan(q, k, v, desc), flavour)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_error(out, ref32) <= bound
    auto = launch.tree_attention(q, k, v, mx.array(desc.table), case.prefix, desc.n_main,
                                 case.window, case.scale)
    assert max_error(auto, ref32) <= bound


def test_sources_are_spliced_and_shipped():
    for flavour in sources.FLAVOURS:
        body = sources.kernel_source(flavour)
        assert "#include" not in body  # MLX's JIT has no include path for our files
        assert "ss_simd_max" in body and "SS_TG_BARRIER" in body
    assert "metal::simd_sum" in sources.kernel_header("metal")
    assert "__shfl_xor_sync" in sources.kernel_header("cuda")
    with pytest.raises(ValueError, match="flavour"):
        sources.kernel_source("vulkan")


SHIM_PROBE = {
    "metal": r"""
#include "metal_shim.h"
void body(uint lane, float* out) {
  out[lane * 6 + 0] = simd_shuffle(float(lane), ushort(31 - lane));
  out[lane * 6 + 1] = simd_shuffle_xor(float(lane), ushort(5));
  out[lane * 6 + 2] = simd_broadcast(float(lane), ushort(7));
  out[lane * 6 + 3] = simd_min(float(lane) + 1.0f);
  out[lane * 6 + 4] = simd_max(float(lane));
  out[lane * 6 + 5] = simd_sum(float(lane));
}
""",
    "cuda": r"""
#include "cuda_shim.h"
void body(unsigned lane, float* out) {
  out[lane * 6 + 0] = __shfl_sync(0xffffffffu, float(lane), 31 - lane);
  out[lane * 6 + 1] = __shfl_xor_sync(0xffffffffu, float(lane), 5);
  out[lane * 6 + 2] = __shfl_sync(0xffffffffu, float(lane), 7);
  out[lane * 6 + 3] = __shfl_down_sync(0xffffffffu, float(lane), 4);
  out[lane * 6 + 4] = __shfl_xor_sync(0xffffffffu, float(lane), 16);
  out[lane * 6 + 5] = __shfl_down_sync(0xffffffffu, float(lane), 1);
}
""",
}
SHIM_MAIN = r"""
int main() {
  static float out[64 * 6];
  ss_emu::launch(2, 1, 32, [&](unsigned x, unsigned, unsigned t) { body(t, out + x * 32 * 6); });
  for (int i = 0; i < 64 * 6; ++i) std::printf("%g\n", out[i]);
}
"""


@pytest.mark.skipif(emulator.compiler() is None, reason="needs a C++ compiler (g++)")
@pytest.mark.parametrize("flavour", ["metal", "cuda"])
def test_shim_simd_collectives(flavour, tmp_path: Path):
    src = tmp_path / "probe.cpp"
    src.write_text(SHIM_PROBE[flavour] + SHIM_MAIN)
    exe = tmp_path / "probe"
    subprocess.run([emulator.compiler(), *emulator.CXX_FLAGS, f"-I{emulator.EMU_DIR}", str(src),
                    "-o", str(exe)], check=True)
    values = np.array(subprocess.run([str(exe)], capture_output=True, text=True, check=True)
                      .stdout.split(), dtype=float).reshape(2, 32, 6)
    lane = np.arange(32)
    for group in values:  # both threadgroups alike
        assert np.array_equal(group[:, 0], 31 - lane)
        assert np.array_equal(group[:, 1], lane ^ 5)
        assert np.array_equal(group[:, 2], np.full(32, 7))
        if flavour == "metal":
            assert np.array_equal(group[:, 3], np.ones(32))
            assert np.array_equal(group[:, 4], np.full(32, 31))
            assert np.array_equal(group[:, 5], np.full(32, lane.sum()))
        else:
            assert np.array_equal(group[:, 3], np.where(lane + 4 < 32, lane + 4, lane))
            assert np.array_equal(group[:, 4], lane ^ 16)
            assert np.array_equal(group[:, 5], np.where(lane + 1 < 32, lane + 1, lane))


def test_bench_kernel_command(tmp_path: Path):
    """Reference columns only on this CPU; with a GPU also the fused ones, close to the reference."""
    import json

    from typer.testing import CliRunner

    from specstream_mlx.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench-kernel", "--tree-sizes", "1,3", "--prefixes", "0,40",
                                      "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                                      "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["nodes"], r["prefix"]) for r in rows] == [(1, 0), (1, 40), (3, 0), (3, 40)]
    assert all(r["rows"] == 4 * r["nodes"] for r in rows)
    if HAS_DEVICE:
        assert all(r["backend"] == launch.backend() and r["fused_ms"] > 0 for r in rows)
        assert all(r["max_abs_diff"] <= 2 * TOLERANCE["float16"] * 4 for r in rows)
    else:
        assert "no fused kernel on backend cpu" in result.output
        assert all(r["backend"] == "cpu" and "fused_ms" not in r for r in rows)
    bad = CliRunner().invoke(app, ["bench-kernel", "--heads", "3", "--kv-heads", "2"])
    assert bad.exit_code == 2 and "multiple" in bad.output


def test_prepare_compiles_every_variant_within_the_limit(monkeypatch):
    if not HAS_DEVICE:
        assert launch.prepare(mx.float16, 128) is None
    probed = []
    monkeypatch.setattr(launch, "backend", lambda: "metal")
    monkeypatch.setattr(launch, "_limits", {})
    monkeypatch.setattr(launch, "_variants", {})
    monkeypatch.setenv(launch.LIMIT_ENV, "128")

    def probe(flavour, dtype, dim, nsimd, sps):
        probed.append(nsimd)
        if nsimd == 2:
            raise RuntimeError("injected")

    monkeypatch.setattr(launch.threadgroup_limit, "__defaults__", (probe,))
    monkeypatch.setattr(launch.check_variant, "__defaults__", (probe,))
    assert launch.prepare(mx.float16, 128) == 128
    assert probed == [4, 1, 2]  # the limit probe, then each count not yet known
    assert {k[3]: why for k, why in launch._variants.items()} == {
        4: None, 1: None, 2: "RuntimeError: injected"}
