"""Settings written once: the checkpoint config (``specstream.json``), the tree spec, the backend.

* ``SpecStreamConfig``: what a checkpoint adds to its mlx-lm model directory.
* ``TreeSettings``: the one description of a draft tree (widths, node cap,
  early-exit pruning), used for a checkpoint's stored defaults and for a
  decode's explicit choice alike.
* ``backend`` and ``tree_settings``: where MLX runs, and the tree a checkpoint
  keeps for that backend, overridden by explicit options.

Defaults live here and nowhere else (``DEFAULT_GAMMA``, ``DEFAULT_STREAM_LAYERS``,
``DEFAULT_MODE``, ``DEFAULT_ADAPTER_RANK``, ``DEFAULT_STREAM_LORA_RANK``, ``TreeSettings()``): the command line,
``loading`` and ``convert`` take theirs from these names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

FORMAT_VERSION = 3  # 2: adapters scale with their row's RMS; 3: shared mode's main rows see no stream
#: Older versions still read, and the modes they mean the same thing for.
READABLE_VERSIONS = {2: ("lossless",)}
CONFIG_FILE = "specstream.json"
WEIGHTS_FILE = "specstream.safetensors"
MODES = ("lossless", "shared")
BACKENDS = ("cpu", "gpu-metal", "gpu-cuda")  # keys of ``tree_by_backend``

DEFAULT_GAMMA = 3  # speculative streams of a new checkpoint
DEFAULT_STREAM_LAYERS = 4  # top layers with multi-stream attention
DEFAULT_MODE = "lossless"
DEFAULT_ADAPTER_RANK = 64  # stream adapters of fresh streams made for training (init/convert: none)
DEFAULT_STREAM_LORA_RANK = 0  # stream-row LoRA of fresh streams made for training (0: none)
#: The stream-row LoRA update of a projection is ``STREAM_LORA_SCALE * x A B`` (part of the format,
#: as mlx-lm's LoRA scale is of its adapters; the same 2.0 as shared mode's ``--lora-scale``).
STREAM_LORA_SCALE = 2.0


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit its base model."""


class ContextOverflowError(ValueError):
    """The prompt (plus the requested tokens) does not fit the model's context."""


@dataclass(frozen=True)
class PruneSettings:
    """Early-exit pruning of a tree before the multi-stream layers.

    Attributes:
        threshold: minimum path probability of a surviving node.
        max_keep: optional cap on surviving rows, root included.
    """

    threshold: float
    max_keep: Optional[int] = None


@dataclass(frozen=True)
class TreeSettings:
    """The shape of the draft tree used at every step (the one tree spec).

    A checkpoint stores these as its defaults (``tree``, ``tree_by_backend``);
    a caller passes them to ``drafters.make_drafter`` to choose explicitly.

    Attributes:
        widths: children per node at each depth; ``len(widths) <= gamma``.
        max_nodes: cap on tree rows, root included (``None``: no cap).
        prune_threshold: early-exit path probability under which sub-trees are
            dropped before the multi-stream layers (``None``: no pruning).
        prune_max_keep: cap on rows kept by pruning (``None``: no cap).

    Raises:
        ValueError: on widths or caps that cannot make a tree.
    """

    widths: tuple = (3, 2, 1)
    max_nodes: Optional[int] = 16
    prune_threshold: Optional[float] = None
    prune_max_keep: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if any(w < 1 for w in self.widths):
            raise ValueError(f"tree widths must be >= 1, got {','.join(map(str, self.widths))}")
        if self.max_nodes is not None and self.max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1 (or none), got {self.max_nodes}")
        if self.prune_max_keep is not None and self.prune_max_keep < 1:
            raise ValueError(f"prune_max_keep must be >= 1 (or none), got {self.prune_max_keep}")

    @property
    def prune(self) -> Optional[PruneSettings]:
        """Early-exit pruning settings, or ``None`` when pruning is off."""
        if self.prune_threshold is None:
            return None
        return PruneSettings(self.prune_threshold, self.prune_max_keep)

    def cut(self, gamma: int) -> "TreeSettings":
        """The same tree, no deeper than ``gamma`` streams can draft."""
        return self if len(self.widths) <= gamma else replace(self, widths=self.widths[:gamma])


@dataclass
class SpecStreamConfig:
    """Settings of the speculative streams.

    Attributes:
        gamma: number of speculative streams (tree depth).
        stream_layers: ``Ns``, the top layers that run multi-stream attention.
        mode: ``"lossless"`` (main stream never sees streams: output is the
            base model's) or ``"shared"`` (the base is fine-tuned too, with LoRA
            and the main loss; the mask is the same: main rows never see streams).
        prune_rank: rank of the early-exit pruning adapter.
        stream_adapter_rank: rank of the residual adapters that act on stream
            rows only, one before each multi-stream layer (0: none).
        stream_lora_rank: rank of the LoRA updates of the multi-stream layers'
            projections (attention and MLP) that act on stream rows only
            (0: none). Lossless mode only: in shared mode LoRA trains every row.
        hidden_size, vocab_size, num_layers: of the base model, checked at load.
        tree: default tree settings, used on a backend without its own entry.
        tree_by_backend: tree settings measured best on one backend (a key of
            ``BACKENDS``), written by ``specstream-mlx bench --sweep --save-tree``:
            the best tree is wide on a GPU, where extra rows are nearly free,
            and a short chain on a CPU, where every row costs compute.
        format_version: of this file.
    """

    gamma: int = DEFAULT_GAMMA
    stream_layers: int = DEFAULT_STREAM_LAYERS
    mode: str = DEFAULT_MODE
    prune_rank: int = 8
    stream_adapter_rank: int = 0
    stream_lora_rank: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    num_layers: int = 0
    tree: TreeSettings = field(default_factory=TreeSettings)
    tree_by_backend: Dict[str, TreeSettings] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def shared(self) -> bool:
        """Shared mode: the base weights are fine-tuned too, so output is the fine-tuned model's."""
        return self.mode == "shared"

    def default_tree(self, backend: str) -> TreeSettings:
        """The tree settings for ``backend``: its own entry, else ``tree``."""
        return self.tree_by_backend.get(backend, self.tree)

    def validate(self) -> None:
        """Raise ``CheckpointError`` on settings that cannot work."""
        if self.mode not in MODES:
            raise CheckpointError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.gamma < 1:
            raise CheckpointError(f"gamma must be >= 1, got {self.gamma}")
        if not 1 <= self.stream_layers <= self.num_layers:
            raise CheckpointError(
                f"stream_layers must be in 1..{self.num_layers} (the base model's layers), "
                f"got {self.stream_layers}"
            )
        if self.stream_adapter_rank < 0 or self.prune_rank < 1:
            raise CheckpointError("adapter ranks must be positive (stream adapters: >= 0)")
        if self.stream_lora_rank < 0:
            raise CheckpointError(f"stream_lora_rank must be >= 0, got {self.stream_lora_rank}")
        if self.stream_lora_rank and self.shared:
            raise CheckpointError(
                "stream LoRA (stream_lora_rank > 0) is for lossless streams: in shared mode the "
                "LoRA of `train --lora-rank` already trains the stream layers for every row. "
                "Drop --stream-lora-rank, or train with --mode lossless."
            )
        unknown = set(self.tree_by_backend) - set(BACKENDS)
        if unknown:
            raise CheckpointError(
                f"tree_by_backend has unknown backends {sorted(unknown)}; known: {BACKENDS}"
            )
        for tree in (self.tree, *self.tree_by_backend.values()):
            if len(tree.widths) > self.gamma:
                raise CheckpointError(f"tree depth {len(tree.widths)} exceeds gamma={self.gamma}")

    def to_dict(self) -> dict:
        data = asdict(self)
        for tree in (data["tree"], *data["tree_by_backend"].values()):
            tree["widths"] = list(tree["widths"])
            if tree["prune_max_keep"] is None:  # written only when set: files stay as before
                del tree["prune_max_keep"]
        if not data["stream_lora_rank"]:  # likewise: older readers still read files without it
            del data["stream_lora_rank"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SpecStreamConfig":
        version = data.get("format_version")
        older = isinstance(version, int) and version in READABLE_VERSIONS
        if older and data.get("mode") == "shared" and "shared" not in READABLE_VERSIONS[version]:
            raise CheckpointError(
                f"{CONFIG_FILE} (format_version {version}) is a shared-mode checkpoint trained "
                "with the old mask, where main rows attended their own streams; shared mode now "
                "uses the paper's mask (main rows never see a stream), so its output would "
                "change. Retrain it: `specstream-mlx train --mode shared ...`."
            )
        if version != FORMAT_VERSION and not older:
            raise CheckpointError(
                f"{CONFIG_FILE} has format_version {version!r}; this specstream-mlx reads "
                f"version {FORMAT_VERSION}. Upgrade specstream-mlx or re-create the checkpoint."
            )
        data = {**data, "format_version": FORMAT_VERSION}  # an older lossless file means the same
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"{CONFIG_FILE} has unknown keys {sorted(unknown)}")
        try:
            by_backend = data.get("tree_by_backend", {})
            return cls(**{**data, "tree": TreeSettings(**data.get("tree", {})),
                          "tree_by_backend": {k: TreeSettings(**v) for k, v in by_backend.items()}})
        except (TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{CONFIG_FILE} is malformed: {exc}") from None


def read_config(model_dir: Path) -> SpecStreamConfig:
    """Read and validate ``specstream.json`` in ``model_dir``."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} has no {CONFIG_FILE}: it is not a specstream-mlx checkpoint. "
            f"Create one with `specstream-mlx init --model {model_dir} --out DIR`."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return SpecStreamConfig.from_dict(data)


def write_config(config: SpecStreamConfig, model_dir: Path) -> None:
    """Write ``specstream.json`` into ``model_dir`` atomically (a temporary file, renamed)."""
    from .atomic import atomic_write_text

    atomic_write_text(Path(model_dir) / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")


def save_backend_tree(model_dir: Path, backend: str, tree: TreeSettings) -> SpecStreamConfig:
    """Store ``tree`` as the default for ``backend`` in the checkpoint at ``model_dir``.

    Raises:
        CheckpointError: ``model_dir`` is not a checkpoint, ``backend`` is unknown
            or the tree is deeper than the checkpoint's streams.
    """
    config = read_config(model_dir)
    config.tree_by_backend = {**config.tree_by_backend, backend: tree}
    config.validate()
    write_config(config, model_dir)
    return config


def backend() -> str:
    """``"cpu"``, ``"gpu-metal"`` or ``"gpu-cuda"``: where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    return "gpu-metal" if mx.metal.is_available() else "gpu-cuda"


def tree_settings(
    config: SpecStreamConfig,
    widths: Optional[tuple] = None,
    max_nodes: Optional[int] = None,
    prune_threshold: Optional[float] = None,
    on: Optional[str] = None,
) -> TreeSettings:
    """The tree to decode with: explicit settings over the checkpoint's default for the backend.

    Args:
        config: the checkpoint's stream settings (``tree`` and ``tree_by_backend``).
        widths: children per depth; given without ``max_nodes``, the tree is uncapped
            (the default's cap was chosen for the default's widths).
        max_nodes: cap on tree rows, root included.
        prune_threshold: early-exit pruning threshold.
        on: backend name (default: the one MLX runs on now).

    Returns:
        Settings cut to the checkpoint's ``gamma``.
    """
    default = config.default_tree(on or backend())
    nodes = max_nodes if max_nodes is not None else (None if widths else default.max_nodes)
    prune = prune_threshold if prune_threshold is not None else default.prune_threshold
    return TreeSettings(tuple(widths or default.widths), nodes, prune,
                        default.prune_max_keep).cut(config.gamma)
