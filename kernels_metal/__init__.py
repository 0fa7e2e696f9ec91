"""Fused tree-attention kernels (Metal source + CUDA twin) and their tooling.

The kernel sources in this folder are read at run time and handed to
``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` (``launch``). The same text
compiles as C++ under a small shim (``emu/``) so it can be run and checked on
a CPU (``emulator``). See README.md for the design and what is verified where.
"""

from .sources import INPUT_NAMES, OUTPUT_NAMES, kernel_header, kernel_source

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "kernel_header", "kernel_source"]
