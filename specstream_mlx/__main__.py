"""``python -m specstream_mlx`` runs the CLI."""

from .cli import main

main()
