"""The ``specstream-mlx`` command line.

``app.py`` holds the typer app and what every command shares (error
translation, option parsing); each other module registers one command group
on it when imported here. Commands parse options and call the library.
"""

from __future__ import annotations

from typing import List, Optional

from .app import app

# Registration: importing a command module adds its commands to ``app`` (in --help order).
from . import generate, kernel, serve, convert, bench, coreml, train, distill, eval  # noqa: E402,F401


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``specstream-mlx`` script."""
    app(args=argv)


__all__ = ["app", "main"]
