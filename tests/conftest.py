"""Shared test set-up. ``tests`` is a package: helpers are imported as ``from .helpers import ...``."""

import specstream_mlx  # noqa: F401  (OpenBLAS before mlx)
