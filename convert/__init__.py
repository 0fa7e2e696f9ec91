"""Converters into specstream-mlx checkpoints, and the PyTorch reference model.

* ``convert``: a Hugging Face model folder / hub repo (safetensors or PyTorch
  ``.bin``) or a llama.cpp GGUF file, plus optional streams trained in PyTorch,
  into a checkpoint (``specstream-mlx convert``).
* ``reference``: ``SpecStreamReference``, the multi-stream forward in PyTorch
  (needs ``pip install "specstream-mlx[torch]"``); it defines the PyTorch SS
  checkpoint format read by ``--streams`` (see ``streams``).
* ``default_model``: the embedded default model (SmolLM2-135M-Instruct).
"""

from .common import ConversionError
from .pipeline import convert

__all__ = ["convert", "ConversionError"]
