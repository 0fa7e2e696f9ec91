"""specstream-mlx: Speculative Streaming decoding on MLX.

The public API mirrors mlx-lm's::

    from specstream_mlx import load, generate, stream_generate
    model, tokenizer = load("path/to/checkpoint")
    text = generate(model, tokenizer, "Hello", max_tokens=64)

Drafting has one knob, ``drafter=`` (default: the checkpoint's tree for this
backend), built by ``make_drafter``::

    from specstream_mlx import TreeSettings, make_drafter
    text = generate(model, tokenizer, "Hello", drafter=make_drafter(model, TreeSettings((3, 2, 1))))
"""

from . import _blas

_blas.preload()  # must run before the first `import mlx.core`

from .config import TreeSettings  # noqa: E402
from .drafters import make_drafter  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "make_drafter",
           "TreeSettings", "__version__"]
