"""Starting the real server in a subprocess and talking to it over HTTP (loopback)."""

from __future__ import annotations

import http.client
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple


def write_text_checkpoint(root: Path, seed: int = 3) -> Path:
    """A tiny random llama checkpoint whose greedy output is printable ASCII.

    The embedding rows (tied to the LM head) of every other token are scaled
    down, so the argmax lands on printable characters: texts differ from prompt
    to prompt and compare meaningfully (random bytes would mostly decode to
    U+FFFD).
    """
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from .helpers import write_base
    from specstream_mlx.loading import init_checkpoint

    base = write_base(root / "base", "llama", seed=seed)
    tokenizer = load_tokenizer(base)
    weights = mx.load(str(base / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    scale = [1.0 if _printable(tokenizer.decode([i])) else 0.1 for i in range(embed.shape[0])]
    weights["model.embed_tokens.weight"] = embed * mx.array(scale)[:, None]
    mx.save_safetensors(str(base / "model.safetensors"), weights)
    return init_checkpoint(str(base), str(root / "ckpt"), gamma=3, stream_layers=2)


def _printable(text: str) -> bool:
    return len(text) == 1 and text.isascii() and text.isprintable()


class ServerProcess:
    """``python -m specstream_mlx serve --port 0 ...`` and the port it chose."""

    def __init__(self, model: Path, *args: str, env: Optional[dict] = None, timeout: float = 120,
                 launcher: Optional[List[str]] = None):
        self.log = tempfile.TemporaryFile()
        command = launcher or [sys.executable, "-m", "specstream_mlx"]  # launcher: e.g. mlx.launch ...
        self.proc = subprocess.Popen(
            [*command, "serve", "--model", str(model), "--port", "0", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env=dict(os.environ, **(env or {})),
            start_new_session=launcher is not None,  # a launcher's ranks go with it on stop()
        )
        self.group = launcher is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "serving" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{self.stderr()}")
        self.url = line.split(" at ")[-1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def memory_kb(self) -> dict:
        """VmHWM, VmRSS and Threads of the server process (Linux /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
        return fields

    def stop(self, timeout: float = 20) -> int:
        if self.group:  # mlx.launch does not stop its ranks when it is stopped
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def request(port: int, method: str, path: str, body=None, raw: Optional[bytes] = None,
            headers: Optional[dict] = None, timeout: float = 120) -> Tuple[int, object]:
    """One HTTP request; returns the status and the decoded JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else None
    finally:
        conn.close()


def stream(port: int, path: str, body: dict, headers: Optional[dict] = None,
           timeout: float = 120) -> Tuple[int, List]:
    """A streaming request; returns the status and the SSE events (``"[DONE]"`` last).

    A non-200 answer comes back as ``(status, [error_json])``.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(dict(body, stream=True)).encode(),
                     headers=dict(headers or {}, **{"Content-Type": "application/json"}))
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, [json.loads(resp.read())]
        assert resp.getheader("Content-Type") == "text/event-stream"
        events = []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[len(b"data: "):]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return resp.status, events
    finally:
        conn.close()


def chat_body(prompt: str, **options) -> dict:
    return dict({"model": "m", "messages": [{"role": "user", "content": prompt}]}, **options)


def streamed_text(events: List) -> str:
    """The text of a streamed chat or text completion."""
    out = []
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        choice = e["choices"][0]
        if "delta" in choice:
            out.append(choice["delta"].get("content") or "")
        else:
            out.append(choice["text"])
    return "".join(out)


def final_chunk(events: List) -> dict:
    """The chunk that carries ``finish_reason``."""
    done = [e for e in events if e != "[DONE]" and e.get("choices")
            and e["choices"][0]["finish_reason"] is not None]
    assert len(done) == 1, events
    return done[0]
