"""The exported interface, read from ``interface.json`` (the single source of truth).

Names of inputs, outputs, states and metadata keys, the mask values and the
meaning of each call are written once, in ``interface.json`` next to this
module. The exporter takes every name from here; the exported package carries
the file in its metadata (``specstream.interface``), where the Swift package
reads it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FILE = Path(__file__).with_name("interface.json")
#: Version of the ``specstream.*`` metadata layout of a package.
FORMAT_VERSION = 1


@lru_cache(maxsize=1)
def interface() -> dict:
    """The parsed ``interface.json``."""
    return json.loads(FILE.read_text())


def version() -> int:
    return int(interface()["interface_version"])


def input_name(role: str) -> str:
    """Name of an input (``input_ids``, ``position_ids``, ``attention_mask``, ...)."""
    return interface()["inputs"][role]["name"]


def output_name(role: str) -> str:
    return interface()["outputs"][role]["name"]


def state_name(role: str) -> str:
    return interface()["states"][role]["name"]


def meta_key(role: str) -> str:
    """Metadata key of ``role`` (``gamma``, ``trees``, ...)."""
    return interface()["metadata"][role]["key"]


def mask_value(kind: str) -> float:
    """Additive mask value: ``visible`` or ``hidden``."""
    return float(interface()["mask"][kind])


def text() -> str:
    """The interface as compact JSON (what goes into the package metadata)."""
    return json.dumps(interface(), separators=(",", ":"))
