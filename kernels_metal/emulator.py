"""Run the Metal and CUDA kernel sources on a CPU, compiled as C++.

The exact ``header`` and ``source`` strings handed to ``mx.fast.metal_kernel``
/ ``mx.fast.cuda_kernel`` are wrapped in the function signature MLX would
generate (same parameter names, types, template constants and Metal
attributes) and compiled with a C++ compiler against ``emu/metal_shim.h`` or
``emu/cuda_shim.h``: one OS thread per SIMD lane, real barriers, SIMD
collectives through shared slots. A small ``main`` reads the inputs from
files, runs the grid of a ``launch.LaunchPlan`` threadgroup by threadgroup and
writes the output. Builds are cached by content hash in a temp directory.

What this verifies: the kernel's arithmetic, indexing, barrier placement and
launch plan. What it cannot: Metal/CUDA-only language rules (address spaces),
the real compilers, speed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import launch
from .sources import INPUT_NAMES, OUTPUT_NAMES, kernel_header, kernel_source

_HERE = Path(__file__).resolve().parent
EMU_DIR = _HERE / "emu"
CXX_FLAGS = ("-std=c++17", "-O2", "-pthread", "-Wall", "-Wno-unused-variable")

# Metal attributes MLX adds to the signature when their name occurs in the
# source, in MLX's order (mx.fast.metal_kernel).
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# How the emulator fills each attribute (x, y: threadgroup; t: thread; n: threads).
_ATTRIBUTE_VALUES = {
    "simdgroup_index_in_threadgroup": "t / 32",
    "thread_index_in_simdgroup": "t % 32",
    "thread_index_in_threadgroup": "t",
    "thread_position_in_threadgroup": "uint3{t, 0, 0}",
    "thread_position_in_grid": "uint3{x * n + t, y, 0}",
    "threadgroup_position_in_grid": "uint3{x, y, 0}",
    "threads_per_threadgroup": "uint3{n, 1, 1}",
    "threads_per_simdgroup": "32u",
    "thread_execution_width": "32u",
    "simdgroups_per_threadgroup": "n / 32",
}

_TYPES = {
    "metal": {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
              "int32": "int32_t", "uint32": "uint32_t"},
    "cuda": {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
             "int32": "int32_t", "uint32": "uint32_t"},
}
_INPUT_DTYPES = {"rows": "uint32", "params": "int32", "scale": "float32"}


def dtype_name(dtype) -> str:
    """``"float32"``, ``"float16"`` or ``"bfloat16"`` for an MLX dtype."""
    return str(dtype).split(".")[-1]


@dataclass(frozen=True)
class Variant:
    """One template instantiation: element dtype, head dim, SIMD groups, slots."""

    dtype: str
    head_dim: int
    simd_groups: int
    slots: int

    @property
    def name(self) -> str:
        return f"{self.dtype}_{self.head_dim}_{self.simd_groups}_{self.slots}"

    @classmethod
    def of(cls, plan: launch.LaunchPlan) -> "Variant":
        t = dict(plan.template)
        return cls(dtype_name(t["T"]), t["HEAD_DIM"], t["NSIMD"], t["SPS"])


def metal_attributes(source: str) -> list:
    """``(name, type)`` of the attributes MLX would add for ``source``."""
    return [(n, t) for n, t in METAL_ATTRIBUTES if n in source]


def _input_type(flavour: str, name: str, dtype: str) -> str:
    return _TYPES[flavour][_INPUT_DTYPES.get(name, dtype)]


def _metal_function(dtype: str) -> str:
    """The kernel as MLX's Metal signature writer lays it out (one per dtype)."""
    source = kernel_source("metal")
    params = [f"  const device {_input_type('metal', n, dtype)}* {n}" for n in INPUT_NAMES]
    params += [f"  device {_TYPES['metal'][dtype]}* {n}" for n in OUTPUT_NAMES]
    params += [f"  {t} {n}" for n, t in metal_attributes(source)]
    return (
        "template <typename T, int HEAD_DIM, int NSIMD, int SPS>\n"
        f"void custom_kernel_{launch.KERNEL_NAME}_{dtype}(\n" + ",\n".join(params) + ") {\n"
        + source + "\n}\n"
    )


def _cuda_function(variant: Variant) -> str:
    """The kernel as MLX's CUDA builder lays it out (one per instantiation)."""
    dtype = variant.dtype
    params = [f"    const {_input_type('cuda', n, dtype)}* {n}" for n in INPUT_NAMES]
    params += [f"    {_TYPES['cuda'][dtype]}* {n}" for n in OUTPUT_NAMES]
    return (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        f"__global__ void custom_kernel_{launch.KERNEL_NAME}_{variant.name}(\n"
        + ",\n".join(params) + ") {\n"
        f"  constexpr int HEAD_DIM = {variant.head_dim};\n"
        f"  constexpr int NSIMD = {variant.simd_groups};\n"
        f"  constexpr int SPS = {variant.slots};\n"
        f"  using T = {_TYPES['cuda'][dtype]};\n\n"
        + kernel_source("cuda") + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def _call_args(flavour: str, variant: Variant) -> str:
    args = [f"reinterpret_cast<const {_input_type(flavour, n, variant.dtype)}*>(in[{i}])"
            for i, n in enumerate(INPUT_NAMES)]
    args.append(f"reinterpret_cast<{_TYPES[flavour][variant.dtype]}*>(out)")
    if flavour == "metal":
        for name, _ in metal_attributes(kernel_source("metal")):
            if name not in _ATTRIBUTE_VALUES:
                raise NotImplementedError(f"the emulator does not model Metal attribute {name!r}")
            args.append(_ATTRIBUTE_VALUES[name])
    return ", ".join(args)


def _runner(flavour: str, variant: Variant) -> str:
    n = variant.simd_groups * 32
    if flavour == "metal":
        call = (f"custom_kernel_{launch.KERNEL_NAME}_{variant.dtype}<{_TYPES['metal'][variant.dtype]}, "
                f"{variant.head_dim}, {variant.simd_groups}, {variant.slots}>({_call_args(flavour, variant)});")
        setup = ""
    else:
        call = f"mlx::core::cu::custom_kernel_{launch.KERNEL_NAME}_{variant.name}({_call_args(flavour, variant)});"
        setup = ("threadIdx = dim3{t, 0, 0}; blockIdx = dim3{x, y, 0}; "
                 "blockDim = dim3{n, 1, 1}; gridDim = dim3{gx, gy, 1};")
    return (
        f"static void run_{variant.name}(const void* const* in, void* out, unsigned gx, unsigned gy) {{\n"
        f"  const unsigned n = {n};\n"
        f"  ss_emu::launch(gx, gy, n, [&](unsigned x, unsigned y, unsigned t) {{\n"
        f"    (void)x; (void)y; (void)gx; (void)gy; {setup}\n"
        f"    {call}\n"
        f"  }});\n}}\n"
    )


_MAIN = r"""
static std::vector<char> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) { std::fprintf(stderr, "emulator: cannot read %s\n", path.c_str()); std::exit(2); }
  std::vector<char> data;
  char buf[65536];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) data.insert(data.end(), buf, buf + got);
  std::fclose(f);
  return data;
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s VARIANT GROUPS_X GROUPS_Y DIR OUT_BYTES\n", argv[0]);
    return 2;
  }
  const std::string variant = argv[1];
  const unsigned gx = std::stoul(argv[2]), gy = std::stoul(argv[3]);
  const std::string dir = argv[4];
  std::vector<std::vector<char>> inputs;
  std::vector<const void*> ptrs;
  for (const char* name : INPUT_FILES) {
    inputs.push_back(read_file(dir + "/" + name + ".bin"));
  }
  for (auto& d : inputs) ptrs.push_back(d.data());
  std::vector<char> out(std::stoul(argv[5]), static_cast<char>(0xff));  // NaN fill
  bool found = false;
RUN_TABLE
  if (!found) { std::fprintf(stderr, "emulator: variant %s was not built\n", variant.c_str()); return 2; }
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out.data(), 1, out.size(), f);
  std::fclose(f);
  return 0;
}
"""


def translation_unit(flavour: str, variants: Iterable[Variant]) -> str:
    """C++ source of an emulator binary holding ``variants`` of ``flavour``."""
    variants = sorted(set(variants), key=lambda v: v.name)
    shim = "metal_shim.h" if flavour == "metal" else "cuda_shim.h"
    parts = [f'#include "{shim}"\n', kernel_header(flavour), "\n"]
    if flavour == "metal":
        parts += [_metal_function(d) for d in sorted({v.dtype for v in variants})]
    else:
        parts += [_cuda_function(v) for v in variants]
    parts += [_runner(flavour, v) for v in variants]
    files = ", ".join(f'"{n}"' for n in INPUT_NAMES)
    table = "\n".join(
        f'  if (variant == "{v.name}") {{ run_{v.name}(ptrs.data(), out.data(), gx, gy); found = true; }}'
        for v in variants
    )
    parts.append(f"static const char* INPUT_FILES[] = {{{files}}};\n")
    parts.append(_MAIN.replace("RUN_TABLE", table))
    return "\n".join(parts)


def compiler() -> Optional[str]:
    """A C++17 compiler on PATH (``$CXX`` first), or ``None``."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(tu: str, extra: Sequence[str], output: Optional[Path]) -> None:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found: install g++ or set $CXX to emulate the kernels")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "emu.cpp"
        src.write_text(tu)
        cmd = [cxx, *CXX_FLAGS, *extra, f"-I{EMU_DIR}", f"-I{EMU_DIR / 'include'}", str(src)]
        if output is not None:
            cmd += ["-o", str(output)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling the kernel under the shim failed:\n{done.stderr[-6000:]}")


def syntax_check(flavour: str, variants: Iterable[Variant]) -> None:
    """``-fsyntax-only`` compile of the kernel variants under the shim (raises on error)."""
    _compile(translation_unit(flavour, variants), ["-fsyntax-only"], None)


def cache_dir() -> Path:
    """Where emulator builds are cached (``$SPECSTREAM_EMU_CACHE`` or the temp dir)."""
    root = os.environ.get("SPECSTREAM_EMU_CACHE") or Path(tempfile.gettempdir()) / "specstream-emu"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Emulator:
    """A compiled CPU build of one kernel flavour, holding a set of variants."""

    def __init__(self, flavour: str, variants: Iterable[Variant]) -> None:
        self.flavour = flavour
        self.variants = frozenset(variants)
        tu = translation_unit(flavour, self.variants)
        digest = hashlib.sha256((tu + " ".join(CXX_FLAGS) + str(compiler())).encode()).hexdigest()[:16]
        self.binary = cache_dir() / f"{flavour}-{digest}"
        if not self.binary.exists():
            staging = self.binary.with_suffix(f".tmp{os.getpid()}")
            _compile(tu, [], staging)
            staging.replace(self.binary)

    def run(self, plan: launch.LaunchPlan, timeout: float = 120.0) -> mx.array:
        """Execute ``plan`` on the CPU; returns the output as an MLX array."""
        variant = Variant.of(plan)
        if variant not in self.variants:
            raise KeyError(f"variant {variant.name} is not in this emulator build")
        threads = plan.threadgroup[0]
        groups_x, groups_y = plan.grid[0] // threads, plan.grid[1]
        out_dtype = plan.output_dtype
        size = int(np.prod(plan.output_shape))
        with tempfile.TemporaryDirectory() as tmp:
            for name, arr in zip(INPUT_NAMES, plan.inputs):
                _to_bytes(arr).tofile(Path(tmp) / f"{name}.bin")
            nbytes = size * out_dtype.size
            cmd = [str(self.binary), variant.name, str(groups_x), str(groups_y), tmp, str(nbytes)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"emulated kernel failed ({done.returncode}): {done.stderr}")
            raw = np.fromfile(Path(tmp) / "out.bin", dtype=np.uint8)
        return _from_bytes(raw, out_dtype).reshape(plan.output_shape)


def _to_bytes(arr: mx.array) -> np.ndarray:
    if arr.dtype == mx.bfloat16:
        return np.array(arr.view(mx.uint16)).reshape(-1)
    return np.ascontiguousarray(np.array(arr)).reshape(-1)


def _from_bytes(raw: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(raw.view(np.uint16)).view(mx.bfloat16)
    return mx.array(raw.view({mx.float32: np.float32, mx.float16: np.float16}[dtype]))


def emulated_tree_attention(emulator: Emulator, simd_groups=None, slots=None, max_threads=256):
    """A fused-kernel implementation (``attention`` dispatch signature) backed by ``emulator``."""

    def impl(q, k, v, table, offset, n_main, window, scale):
        plan = launch.make_plan(q, k, v, table, offset, n_main, window, scale,
                                max_threads=max_threads, simd_groups=simd_groups, slots=slots)
        return emulator.run(plan)

    return impl


def shipped_variants() -> list:
    """The variants the runtime can launch: every dtype x head dim, 1 and 8 SIMD groups."""
    return [Variant(d, h, n, launch.slots_per_group(h))
            for d in ("float32", "float16", "bfloat16") for h in launch.HEAD_DIMS for n in (1, 8)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m specstream_mlx.kernels_metal.emulator``: syntax-check both flavours (CI)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--syntax-only"]):
        print("usage: python -m specstream_mlx.kernels_metal.emulator [--syntax-only]",
              file=sys.stderr)
        return 2
    for flavour in ("metal", "cuda"):
        syntax_check(flavour, shipped_variants())
        print(f"{flavour}: kernel source compiles under the shim ({len(shipped_variants())} variants)")
    return 0


__all__ = ["Emulator", "Variant", "emulated_tree_attention", "main", "metal_attributes",
           "shipped_variants", "syntax_check", "translation_unit"]

if __name__ == "__main__":
    raise SystemExit(main())
