"""An OpenAI-compatible local HTTP server (``specstream-mlx serve``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or
server-sent events), ``GET /v1/models``, ``GET /health``. HTTP runs on the
standard library's threading server, one thread per connection; generation
runs on the ``Engine``'s single worker thread, so one model serves one
request at a time and the rest wait in a bounded queue (over the bound: 429).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

from .worker import Engine, GenerationRequest, Job, QueueFullError
from .protocol import (APIError, ParsedRequest, Responses, error_body, parse_request,
                       resolve_max_tokens, usage)

log = logging.getLogger("specstream_mlx.serve.http")

MAX_BODY = 8 * 1024 * 1024
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
GET_ROUTES = ("/health", "/v1/models")
POST_ROUTES = ("/v1/chat/completions", "/v1/completions")


class ServerStartError(ValueError):
    """The server could not start (port taken, bad host ...)."""


@dataclass
class ServerSettings:
    """Options of ``specstream-mlx serve``.

    Attributes:
        model: checkpoint directory or hub repo id.
        host, port: where to listen (port 0: any free port).
        api_key: when set, every request needs ``Authorization: Bearer <key>``.
        max_queue: requests that may wait while one generates (over it: 429).
        max_tokens: the limit for requests that give no ``max_tokens``.
        speculative: ``False`` serves plain one-token decoding.
        watch_stdin: exit when standard input closes (the parent app went away).
        shard: ``"tensor"`` or ``"pipeline"``: the model split across the ``mlx.launch``
            ranks; rank 0 serves HTTP, the others follow its requests.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    max_queue: int = 8
    max_tokens: int = 512
    speculative: bool = True
    watch_stdin: bool = False
    shard: Optional[str] = None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class App:
    """What the request handlers share: the engine, the tokenizer, the settings."""

    def __init__(self, engine: Engine, model_id: str, settings: ServerSettings):
        from ..generate import max_context

        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_id = model_id
        self.settings = settings
        self.context = max_context(engine.model)
        self.vocab_size = engine.model.config.vocab_size
        self.created = int(time.time())
        self.check_host = settings.api_key is None and is_loopback(settings.host)

    def prompt_tokens(self, req: ParsedRequest) -> list:
        """Token ids of the request's prompt (chat: through the chat template)."""
        from ..generate import encode_prompt
        from ..prompts import format_messages

        if req.chat:
            try:
                text = format_messages(self.tokenizer, req.messages)
            except Exception as exc:  # jinja errors from the model's own template
                raise APIError(400, f"the model's chat template refused these messages: {exc}",
                               param="messages") from None
            return encode_prompt(self.tokenizer, text)
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if t >= self.vocab_size]
            if bad:
                raise APIError(400, f"'prompt': token ids must be below the vocabulary size "
                                    f"{self.vocab_size}, got {bad[0]}", param="prompt")
            return list(req.prompt)
        return encode_prompt(self.tokenizer, req.prompt)


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection; requests on it are handled in turn (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "specstream-mlx"
    timeout = 300  # seconds a connection may stall (idle keep-alive, slow reader)

    @property
    def app(self) -> App:
        return self.server.app

    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, POST_ROUTES)

    def do_POST(self):
        self._dispatch({"/v1/chat/completions": lambda: self._complete(True),
                        "/v1/completions": lambda: self._complete(False)}, GET_ROUTES)

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    def _dispatch(self, routes, other_method_routes) -> None:
        self._started = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            self._check_host()
            self._check_key()
            if path not in routes:
                if path in other_method_routes:
                    raise APIError(405, f"{path} does not take {self.command}")
                raise APIError(404, f"no route {self.command} {path}; this server offers "
                                    f"GET {', '.join(GET_ROUTES)} and POST {', '.join(POST_ROUTES)}",
                               code="not_found")
            routes[path]()
        except APIError as exc:
            self._send_error(exc.status, exc.body())
        except OSError as exc:  # the client went away mid-response
            log.info("connection lost: %s", exc)
            self.close_connection = True
        except Exception as exc:  # never let one request take the server down
            log.error("internal error on %s %s: %s: %s", self.command, path, type(exc).__name__, exc)
            self._send_error(500, error_body(f"internal error: {exc}", "server_error"))

    def _send_error(self, status: int, body: dict) -> None:
        """Answer with an error body (if nothing was sent yet) and close the connection."""
        self.close_connection = True
        if self._started:
            return
        try:
            self._send_json(status, body, close=True)
        except OSError:
            pass

    def _check_host(self) -> None:
        if not self.app.check_host:
            return
        host = self.headers.get("Host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if host and name.lower() not in LOOPBACK_NAMES:
            raise APIError(403, f"Host {host!r} is not this machine: a server bound to loopback "
                                f"answers only localhost, 127.0.0.1 or [::1] (a guard against "
                                f"DNS rebinding); use one of those names", code="bad_host")

    def _check_key(self) -> None:
        key = self.app.settings.api_key
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                "with the key given to --api-key", kind="authentication_error",
                           code="invalid_api_key")

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.app.model_id,
                              "queue": self.app.engine.status()})

    def _models(self) -> None:
        model = {"id": self.app.model_id, "object": "model", "created": self.app.created,
                 "owned_by": "specstream-mlx"}
        self._send_json(200, {"object": "list", "data": [model]})

    def _read_json(self):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, "send the body as JSON with the header "
                                "'Content-Type: application/json'")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411, "send the body with a Content-Length header (chunked request "
                                "bodies are not supported)")
        if int(length) > MAX_BODY:
            raise APIError(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON ({exc})") from None

    def _complete(self, chat: bool) -> None:
        app = self.app
        req = parse_request(self._read_json(), chat)
        try:
            tokens = app.prompt_tokens(req)
        except ValueError as exc:  # e.g. a prompt that encodes to no tokens
            raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
        max_tokens = resolve_max_tokens(req.max_tokens, len(tokens), app.context,
                                        app.settings.max_tokens)
        try:
            job = app.engine.submit(GenerationRequest(
                prompt_tokens=tokens, max_tokens=max_tokens, sampling=req.sampling,
                seed=req.seed, stop=req.stop,
            ))
        except QueueFullError as exc:
            raise APIError(429, str(exc), kind="rate_limit_error", code="queue_full") from None
        except RuntimeError as exc:
            raise APIError(503, str(exc), kind="server_error") from None
        responses = Responses(chat, app.model_id)
        try:
            if req.stream:
                self._stream(job, responses, req.include_usage)
            else:
                self._respond(job, responses)
        finally:
            job.cancel()  # no-op once finished; stops generation on any early exit

    def _respond(self, job: Job, responses: Responses) -> None:
        parts, finished = [], None
        for kind, value in job.events(client_gone=self._client_gone):
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise APIError(500, value, kind="server_error")
            else:
                finished = value
        if finished is None:  # the client left before the end
            self.close_connection = True
            return
        self._send_json(200, responses.full(
            "".join(parts), finished.finish_reason,
            usage(finished.prompt_tokens, finished.completion_tokens), finished.stats,
        ))

    def _stream(self, job: Job, responses: Responses, include_usage: bool) -> None:
        self._chunked = self.request_version != "HTTP/1.0"  # 1.0 clients: end = close
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._started = True
        if responses.chat:
            self._event(responses.chunk(None, first=True))
        for kind, value in job.events(client_gone=self._client_gone):
            if kind == "text":
                self._event(responses.chunk(value))
            elif kind == "error":
                self._event(error_body(value, "server_error"))
            else:
                self._event(responses.chunk(None, value.finish_reason, value.stats))
                if include_usage:
                    self._event(responses.usage_chunk(
                        usage(value.prompt_tokens, value.completion_tokens)))
        if job.cancelled:  # client gone: no point in finishing the stream
            self.close_connection = True
            return
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, obj: dict) -> None:
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        """One piece of a chunked body (an empty one ends the body)."""
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "1")
        if close:  # the request body may be unread: do not reuse the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (checked while waiting)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class Server(ThreadingHTTPServer):
    """The threading HTTP server, IPv6-aware, with a deeper accept backlog."""

    request_queue_size = 64
    daemon_threads = True

    def __init__(self, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.app: Optional[App] = None


def make_server(host: str, port: int) -> Server:
    """Bind the listening socket (before the slow model load, to fail fast).

    Raises:
        ServerStartError: the address is taken or cannot be bound.
    """
    try:
        return Server(host, port)
    except OSError as exc:
        hint = ("pick another with --port (0: any free port)" if "in use" in str(exc)
                else "check --host")
        raise ServerStartError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}") from None


def _exit_on_stdin_eof(server: Server) -> None:
    """Shut the server down once standard input closes."""
    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        log.info("standard input closed: shutting down")
        server.shutdown()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(settings: ServerSettings) -> None:
    """Load the model and serve until interrupted (Ctrl-C, SIGTERM, stdin closed).

    Prints ``specstream-mlx: serving <model> at http://HOST:PORT`` on standard
    output once requests are answered (apps can wait for that line).

    Raises:
        ServerStartError: the address cannot be bound.
        CheckpointError, UnsupportedArchitectureError: the model cannot be loaded.
    """
    from ..loading import load

    if settings.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {settings.max_queue}")
    if settings.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {settings.max_tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    channel = None
    if settings.shard is not None:
        from ..shard import Channel, check_mode, group, is_main

        check_mode(settings.shard)
        world = group(settings.shard)
        if not is_main():  # no socket here: follow rank 0's requests
            from .worker import follow

            model, tokenizer = load(settings.model, shard=settings.shard)
            follow(model, tokenizer, Channel(world), settings.speculative)
            return
        channel = Channel(world)
    engine = Engine(lambda: load(settings.model, shard=settings.shard), settings.max_queue,
                    settings.speculative, channel=channel)
    # Bind before the slow load to fail fast; in a sharded run after it, since the other
    # ranks are already loading and would wait forever for a rank 0 that gave up.
    server = make_server(settings.host, settings.port) if channel is None else None
    try:
        engine.start()
        if server is None:
            server = make_server(settings.host, settings.port)
        server.app = App(engine, settings.model, settings)
        if not is_loopback(settings.host) and settings.api_key is None:
            log.warning("listening on %s without --api-key: anyone who can reach this "
                        "address can use the model", settings.host)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        if settings.watch_stdin:
            _exit_on_stdin_eof(server)
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"specstream-mlx: serving {settings.model} at http://{shown}:{port}", flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.server_close()
        engine.stop()
