"""specstream-mlx: Speculative Streaming decoding on MLX.

The public API mirrors mlx-lm's::

    from specstream_mlx import load, generate, stream_generate
    model, tokenizer = load("path/to/checkpoint")
    text = generate(model, tokenizer, "Hello", max_tokens=64)
"""

from . import _blas

_blas.preload()  # must run before the first `import mlx.core`

from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "__version__"]
