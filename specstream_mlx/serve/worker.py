"""One model, one generation thread, a bounded queue of requests.

MLX is not safe for concurrent use of one model, so every generation runs on
the engine's own worker thread, one request at a time, in arrival order.
Other threads (the HTTP handlers) submit ``GenerationRequest``s and read the
resulting ``Job``'s events. A job can be cancelled at any time (the client
went away); the worker then stops at the next token.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx

from ..config import TreeSettings
from ..drafters import make_drafter
from ..generate import stream_generate
from ..verify import SamplingParams
from .stops import StopMatcher

log = logging.getLogger("specstream_mlx.serve.http")


class QueueFullError(RuntimeError):
    """The engine already holds as many requests as it may."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate.

    Attributes:
        prompt_tokens: prompt token ids (already templated and encoded).
        max_tokens: most tokens to generate.
        sampling: sampling settings (default: greedy), passed unchanged to
            ``stream_generate``.
        seed: seed for sampling, or ``None``.
        stop: stop strings (generation ends before the first one found).
    """

    prompt_tokens: List[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()


@dataclass
class Finished:
    """The end of a job.

    Attributes:
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"``.
        prompt_tokens, completion_tokens: token counts for ``usage``.
        stats: speed and speculative figures (tokens per forward etc.).
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict = field(default_factory=dict)


class Job:
    """One submitted request: its events and its cancel switch.

    Events, read with ``events()``: ``("text", str)`` pieces, then either
    ``("done", Finished)`` or ``("error", message)``.
    """

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._events: "queue.Queue[tuple]" = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job (or skip it if it has not started)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, kind: str, value) -> None:
        self._events.put((kind, value))

    def events(self, poll: float = 0.05, client_gone=None) -> Iterator[tuple]:
        """Yield events until the job ends.

        Args:
            poll: seconds between checks of ``client_gone``.
            client_gone: optional callable, checked every ``poll`` seconds
                (also while events keep coming); when it returns true the job
                is cancelled and the iteration stops.
        """
        next_check = time.monotonic() + poll
        while True:
            try:
                event = self._events.get(timeout=poll)
            except queue.Empty:
                event = None
            if client_gone is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + poll
                if client_gone():
                    self.cancel()
                    return
            if event is None:
                continue
            yield event
            if event[0] in ("done", "error"):
                return


class Engine:
    """Runs ``GenerationRequest``s one at a time on a worker thread.

    The worker thread also loads the model (as mlx-lm's server does), so every
    MLX operation on it happens on one thread.

    Args:
        loader: returns ``(model, tokenizer)``, e.g. ``lambda: load(path)``.
        max_queue: requests that may wait while one is generating; a request
            over that bound is refused with ``QueueFullError``.
        speculative: ``False`` decodes one token per forward (baseline).
        tree: draft tree settings; default: the checkpoint's.
        channel: a ``shard.Channel`` on rank 0 of a sharded run: each request and, per
            token, whether to go on, are passed to the other ranks (``follow``).
    """

    def __init__(self, loader: Callable[[], tuple], max_queue: int = 8,
                 speculative: bool = True, tree: Optional[TreeSettings] = None, channel=None):
        if max_queue < 0:
            raise ValueError(f"the queue bound must be >= 0, got {max_queue}")
        self.model = self.tokenizer = None
        self.max_queue = max_queue
        self.speculative = speculative
        self.tree = tree
        self.channel = channel
        self._loader = loader
        self._load_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._waiting: "collections.deque[Job]" = collections.deque()
        self._running: Optional[Job] = None
        self._cond = threading.Condition()
        self._stopping = False
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._memory = {}
        self._thread = threading.Thread(target=self._work, name="specstream-generate", daemon=True)

    def start(self) -> "Engine":
        """Start the worker and wait until it has loaded the model.

        Raises:
            Whatever the loader raised (a bad checkpoint path ...).
        """
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every job and end the worker thread."""
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + ([self._running] if self._running else []):
                job.cancel()
                job.put("error", "the server is shutting down")
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            RuntimeError: the engine is stopping.
        """
        job = Job(request)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._drop_cancelled()
            held = len(self._waiting) + (1 if self._running is not None else 0)
            if held >= self.max_queue + 1:
                raise QueueFullError(
                    f"the server is busy: {self.max_queue} requests are already waiting "
                    f"(the bound set by --max-queue); retry later"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def status(self) -> dict:
        """Queue state and the memory figures after the last request."""
        with self._cond:
            self._drop_cancelled()
            return {
                "busy": self._running is not None,
                "waiting": len(self._waiting),
                "max_queue": self.max_queue,
                **self._counts,
                "memory": dict(self._memory),
            }

    def _drop_cancelled(self) -> None:
        """Free the queue slots of waiting jobs whose clients left (lock held)."""
        kept = [job for job in self._waiting if not job.cancelled]
        self._counts["cancelled"] += len(self._waiting) - len(kept)
        self._waiting = collections.deque(kept)

    def _work(self) -> None:
        try:
            try:
                self.model, self.tokenizer = self._loader()
            except Exception as exc:
                self._load_error = exc
                return
            finally:
                self._ready.set()
            self._serve_jobs()
        finally:
            # MLX needs each thread that used it to free its streams before the
            # thread (or the process) ends; without this, exits abort at random.
            clear = getattr(mx, "clear_streams", None)
            if clear is not None:
                clear()

    def _serve_jobs(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    if self.channel is not None:
                        self.channel.share(None)  # the other ranks stop following
                    return
                job = self._running = self._waiting.popleft()
            outcome = "cancelled"
            try:
                if not job.cancelled and self._generate(job):
                    outcome = "completed"
            except Exception as exc:  # a failed request must not end the worker
                outcome = "failed"
                log.error("generation failed: %s: %s", type(exc).__name__, exc)
                job.put("error", f"generation failed ({type(exc).__name__}: {exc})")
            finally:
                with self._cond:
                    self._running = None
                    self._counts[outcome] += 1
                    self._memory = {
                        "active_mb": mx.get_active_memory() / 1e6,
                        "cache_mb": mx.get_cache_memory() / 1e6,
                        "last_request_peak_mb": mx.get_peak_memory() / 1e6,
                    }

    def _generate(self, job: Job) -> bool:
        """Run one job; ``False`` when it was cancelled before the end."""
        r = job.request
        matcher = StopMatcher(r.stop)
        mx.reset_peak_memory()
        if self.channel is not None:
            self.channel.share({"prompt_tokens": list(r.prompt_tokens), "max_tokens": r.max_tokens,
                                "sampling": dataclasses.asdict(r.sampling), "seed": r.seed})
        steps = stream_generate(
            self.model, self.tokenizer, r.prompt_tokens, r.max_tokens,
            sampling=r.sampling, seed=r.seed,
            drafter=make_drafter(self.model, self.tree, speculative=self.speculative),
        )
        last, finish = None, None
        try:
            for last in steps:
                if job.cancelled:
                    if self.channel is not None:
                        self.channel.flag(False)
                    return False
                text, stopped = matcher.feed(last.text)
                if text:
                    job.put("text", text)
                if self.channel is not None:  # the other ranks go on (or stop) with this one
                    self.channel.flag(not stopped)
                if stopped:
                    finish = "stop"
                    break
                finish = last.finish_reason
        finally:
            steps.close()
        tail = matcher.flush()
        if tail:
            job.put("text", tail)
        job.put("done", Finished(
            finish_reason=finish or "length",
            prompt_tokens=len(r.prompt_tokens),
            completion_tokens=last.generation_tokens if last else 0,
            stats=_spec_stats(last, self.speculative),
        ))
        return True


def follow(model, tokenizer, channel, speculative: bool = True, tree: Optional[TreeSettings] = None) -> None:
    """The other ranks' side of a sharded server: run each request rank 0's ``Engine``
    runs, token for token, until it stops; return when the server shuts down.

    A request that fails fails on every rank at the same point (same tokens, same
    checks), and rank 0's engine goes on to the next one; so does this loop.
    """
    while True:
        request = channel.share()
        if request is None:
            return
        try:
            steps = stream_generate(model, tokenizer, request["prompt_tokens"], request["max_tokens"],
                                    sampling=SamplingParams(**request["sampling"]), seed=request["seed"],
                                    drafter=make_drafter(model, tree, speculative=speculative))
            try:
                for _ in steps:
                    if not channel.flag():
                        break
            finally:
                steps.close()
        except Exception as exc:  # as rank 0's worker: log it, take the next request
            log.error("generation failed on this rank: %s: %s", type(exc).__name__, exc)


def _spec_stats(last, speculative: bool) -> dict:
    """The ``specstream`` extension field of a response."""
    if last is None:
        return {}
    return {
        "speculative": speculative,
        "forwards": last.forwards,
        "tokens_per_forward": last.tokens_per_forward,
        "acceptance_by_depth": list(last.acceptance_by_depth),
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory,
    }
