"""The OpenAI-compatible HTTP server: HTTP handling, the job queue, the protocol and stop strings.

A wing around the core: it imports the core, never ``train``, ``bench`` or ``cli``.
"""
