"""Measurement: the speed benchmark (run, report, environment, prompts) and task evaluation.

A wing around the core: it imports the core, never ``train``, ``serve`` or ``cli``.
"""
