"""``specstream-mlx serve``: option parsing only (the work is ``serve.http``)."""

from __future__ import annotations

from typing import Optional

import typer

from .app import UsageError, _run, app, model_or_default


@app.command()
def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint directory or HF repo id (default: the embedded SmolLM2)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port, printed at start)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="SPECSTREAM_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every request."),
    max_queue: int = typer.Option(8, "--max-queue", help="Requests that may wait while one generates; more get 429."),
    max_tokens: int = typer.Option(512, "-m", "--max-tokens", help="Limit for requests that give no max_tokens."),
    no_spec: bool = typer.Option(False, "--no-spec", help="Plain one-token decoding (baseline)."),
    watch_stdin: bool = typer.Option(False, "--watch-stdin", help="Exit when standard input closes (for apps)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="tensor | pipeline: split the model across "
                                        "the processes `mlx.launch` started (rank 0 serves HTTP)."),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    from ..serve.http import ServerSettings, ServerStartError
    from ..serve.http import serve as run_server

    def run():
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {port}")
        try:
            run_server(ServerSettings(
                model=model_or_default(model), host=host, port=port, api_key=api_key or None, max_queue=max_queue,
                max_tokens=max_tokens, speculative=not no_spec, watch_stdin=watch_stdin, shard=shard,
            ))
        except ServerStartError as exc:
            raise UsageError(str(exc)) from None

    _run(run, ctx)
