"""Where MLX runs, and the draft tree a checkpoint keeps for that backend."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .config import SpecStreamConfig
from .decode import TreeSettings


def backend() -> str:
    """``"cpu"``, ``"gpu-metal"`` or ``"gpu-cuda"``: where MLX runs by default."""
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
    return TreeSettings(tuple(widths or default.widths)[: config.gamma], nodes, prune)


__all__ = ["backend", "tree_settings"]
