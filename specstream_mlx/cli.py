"""The ``specstream-mlx`` command line. Commands parse options and call the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import _blas  # noqa: F401  (loads OpenBLAS before mlx)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Speculative Streaming decoding on MLX: one model drafts its own future tokens.",
)


class UsageError(ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn):
    """Call ``fn`` turning the library's input errors into one-line messages."""
    from .config import CheckpointError
    from .decode import ContextOverflowError
    from .families import UnsupportedArchitectureError

    try:
        return fn()
    except UsageError as exc:
        _fail(str(exc), 2)
    except (CheckpointError, UnsupportedArchitectureError, ContextOverflowError) as exc:
        _fail(str(exc))
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        _fail(str(exc))


def _parse_widths(text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise UsageError(f"--tree-width takes comma-separated integers like 3,2,1, got {text!r}")
    if not widths or any(w < 1 for w in widths):
        raise UsageError(f"--tree-width needs positive widths like 3,2,1, got {text!r}")
    return widths


@app.command()
def init(
    model: str = typer.Option(..., "--model", help="Base mlx-lm model directory or HF repo id."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory."),
    gamma: int = typer.Option(3, help="Number of speculative streams."),
    stream_layers: int = typer.Option(4, "--stream-layers", help="Top layers with multi-stream attention."),
    mode: str = typer.Option("lossless", help="lossless | shared"),
    seed: int = typer.Option(0, help="Seed for the fresh stream parameters."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Turn a plain mlx-lm model into a checkpoint with fresh (untrained) streams."""
    from .loading import init_checkpoint

    path = _run(lambda: init_checkpoint(
        model, str(out), gamma=gamma, stream_layers=stream_layers, mode=mode,
        seed=seed, overwrite=overwrite,
    ))
    typer.echo(f"wrote {path} (gamma={gamma}, stream layers={stream_layers}, mode={mode})")


def check_decode_options(max_tokens: int, temp: float, max_nodes: Optional[int]) -> None:
    """Refuse decoding options that cannot work (``UsageError``)."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if temp < 0:
        raise UsageError(f"--temp must be >= 0, got {temp}")
    if max_nodes is not None and max_nodes < 1:
        raise UsageError(f"--max-nodes must be >= 1, got {max_nodes}")


def model_or_default(model: Optional[str]) -> str:
    """``--model``, or the embedded default model (converted into the cache on first use)."""
    if model is not None:
        return model
    from .convert.default_model import default_model_path

    return str(default_model_path())


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty: pass text with -p/--prompt (or - for stdin)")
    return prompt


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint directory or HF repo id (default: SmolLM2-135M-Instruct)."),
    prompt: str = typer.Option(..., "-p", "--prompt", help="Prompt text, or - to read stdin."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens", help="Maximum tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling (0 or 1: off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the top-k tokens (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System message."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template", help="Use the raw prompt."),
    no_spec: bool = typer.Option(False, "--no-spec", help="Plain one-token decoding (baseline)."),
    tree_width: Optional[str] = typer.Option(None, "--tree-width", help="Children per depth, e.g. 3,2,1."),
    max_nodes: Optional[int] = typer.Option(None, "--max-nodes", help="Cap on tree rows (root included)."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", help="Early-exit pruning threshold."),
    lookup: int = typer.Option(0, "--lookup", help="Also draft up to N prompt-lookup tokens per step beside the tree (0: off)."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the statistics as JSON."),
    verbose: bool = typer.Option(False, "--verbose", help="Print backend, BLAS and dtype."),
):
    """Generate text, printing it as it comes, then the statistics."""

    def run():
        check_decode_options(max_tokens, temp, max_nodes)
        if lookup < 0:
            raise UsageError(f"--lookup takes a number of tokens >= 0, got {lookup}")
        if lookup and no_spec:
            raise UsageError("--lookup drafts tokens and --no-spec turns drafting off: give one of them")
        text = _read_prompt(prompt)
        widths = _parse_widths(tree_width)
        from .generate import format_stats, stream_generate
        from .loading import load
        from .prompts import format_prompt
        from .runtime import tree_settings

        ss_model, tokenizer = load(model_or_default(model))
        tree = tree_settings(ss_model.config, widths, max_nodes, prune_threshold)
        if verbose:
            typer.echo(describe_runtime(ss_model, tree), err=True)
        full = format_prompt(tokenizer, text, system_prompt, ignore_chat_template)
        drafter = None
        if lookup:
            from .pld import StreamLookupDrafter

            drafter = StreamLookupDrafter(ss_model, tree, num_tokens=lookup)
        last = None
        for last in stream_generate(
            ss_model, tokenizer, full, max_tokens, temp=temp, top_p=top_p, top_k=top_k,
            seed=seed, tree=tree, speculative=not no_spec, drafter=drafter,
        ):
            typer.echo(last.text, nl=False)
        typer.echo()
        typer.echo(format_stats(last))
        if stats_json is not None:
            stats_json.write_text(json.dumps(last.stats(), indent=2) + "\n")

    _run(run)


def _parse_ints(text: str, option: str) -> list:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers like 4,16,40, got {text!r}")
    if not values or any(x < 0 for x in values):
        raise UsageError(f"{option} needs non-negative integers like 4,16,40, got {text!r}")
    return values


@app.command("bench-kernel")
def bench_kernel(
    tree_sizes: str = typer.Option("4,16,40", "--tree-sizes", help="Tree nodes, comma-separated."),
    prefixes: str = typer.Option("0,512,2048", "--prefixes", help="Cached prefix lengths."),
    gamma: int = typer.Option(3, help="Stream rows per node (multi-stream layer)."),
    heads: int = typer.Option(32, help="Query heads."),
    kv_heads: int = typer.Option(8, "--kv-heads", help="Key/value heads."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head dimension (64/96/128/256)."),
    dtype: Optional[str] = typer.Option(None, help="float16 | bfloat16 | float32 (default: float16 on a GPU, float32 on the CPU)."),
    repeats: int = typer.Option(20, help="Timed repetitions per configuration."),
    window: Optional[int] = typer.Option(None, help="Sliding window of the layer."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
):
    """Time fused tree attention against the reference (SDPA + dense mask)."""

    def run():
        import mlx.core as mx

        from .kernels_metal import bench, launch

        sizes = _parse_ints(tree_sizes, "--tree-sizes")
        lengths = _parse_ints(prefixes, "--prefixes")
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise UsageError(f"--heads ({heads}) must be a positive multiple of --kv-heads ({kv_heads})")
        if any(n < 1 for n in sizes):
            raise UsageError("--tree-sizes must be >= 1")
        chosen = dtype or ("float16" if mx.default_device().type == mx.DeviceType.gpu else "float32")
        typer.echo(f"[bench-kernel] backend {launch.backend() or 'cpu'}, {chosen}, heads {heads}/{kv_heads}, "
                   f"head dim {head_dim}, gamma {gamma}, median of {repeats}", err=True)
        results = bench.run(sizes, lengths, gamma, heads, kv_heads, head_dim, chosen, repeats, window)
        typer.echo(bench.format_table(results))
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2) + "\n")

    _run(run)


@app.command()
def serve(
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
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    from .server import ServerSettings, ServerStartError
    from .server import serve as run_server

    def run():
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {port}")
        try:
            run_server(ServerSettings(
                model=model_or_default(model), host=host, port=port, api_key=api_key or None, max_queue=max_queue,
                max_tokens=max_tokens, speculative=not no_spec, watch_stdin=watch_stdin,
            ))
        except ServerStartError as exc:
            raise UsageError(str(exc)) from None

    _run(run)


from .convert.cli import convert_command  # noqa: E402

app.command("convert")(convert_command)


def describe_runtime(model, tree=None) -> str:
    """Backend, BLAS, dtype and the tree in use, for ``--verbose``."""
    import mlx.core as mx

    from .runtime import backend

    dtype = model.base.model.norm.weight.dtype
    text = (
        f"[specstream-mlx] mlx {mx.__version__}, backend {backend()}, dtype {dtype}, "
        f"{_blas.describe()}, gamma={model.config.gamma}, "
        f"stream layers={model.config.stream_layers}, mode={model.config.mode}"
    )
    if tree is not None:
        own = backend() in model.config.tree_by_backend
        text += (f", tree {','.join(map(str, tree.widths))} max nodes {tree.max_nodes or 'all'}"
                 f" (checkpoint default: {'this backend' if own else 'fallback'})")
    return text


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv)


# Commands defined in other modules register themselves on `app` when imported.
from . import cli_bench, cli_coreml, cli_train  # noqa: E402,F401


if __name__ == "__main__":
    main()
