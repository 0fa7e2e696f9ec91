"""Training: the loop, cached (frozen-prefix) training, losses, distillation and data.

A wing around the core: it imports the core, never ``bench``, ``serve`` or ``cli``.
"""
