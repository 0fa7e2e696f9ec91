"""The real server (`specstream-mlx serve`) on a loopback port, driven over HTTP.

One server process (queue bound 4) serves most tests; a tiny random llama
checkpoint (biased towards printable text) keeps every request short. Expected texts come from the library's
own greedy ``generate`` (or the ``generate`` command) for the same prompt.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from .serving import (ServerProcess, chat_body, final_chunk, request, stream, streamed_text, write_text_checkpoint)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from specstream_mlx import load

    return load(str(checkpoint))


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = ServerProcess(checkpoint, "--max-queue", "4")
    yield srv
    srv.stop()


def reference(loaded, prompt, max_tokens, chat=True) -> str:
    """Greedy text from the in-process API (chat: through the chat template)."""
    from specstream_mlx import generate
    from specstream_mlx.prompts import format_prompt

    model, tokenizer = loaded
    text = format_prompt(tokenizer, prompt) if chat else prompt
    return generate(model, tokenizer, text, max_tokens=max_tokens, temp=0.0)


def health(server) -> dict:
    status, body = request(server.port, "GET", "/health")
    assert status == 200
    return body


def test_health_and_models(server, checkpoint):
    body = health(server)
    assert body["status"] == "ok" and body["queue"]["max_queue"] == 4
    status, models = request(server.port, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [str(checkpoint)]


def test_greedy_chat_equals_generate_command(server, checkpoint):
    prompt = "Tell me about speculative decoding."
    cli = subprocess.run(
        [sys.executable, "-m", "specstream_mlx", "generate", "--model", str(checkpoint),
         "-p", prompt, "-m", "24"],
        capture_output=True, timeout=120, env=dict(os.environ, PYTHONIOENCODING="utf-8"),
    )
    assert cli.returncode == 0, cli.stderr.decode()
    out = cli.stdout.decode()
    expected = out[: out.rindex("\n" + "=" * 10 + "\nPrompt:")]
    cli_tokens = int(re.search(r"Generation: (\d+) tokens", out).group(1))
    cli_stats = re.search(r"Forwards: (\d+), tokens per forward: ([\d.]+)", out)
    assert expected

    status, body = request(server.port, "POST", CHAT, chat_body(prompt, max_tokens=24, temperature=0))
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["completion_tokens"] == cli_tokens
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + cli_tokens
    assert body["specstream"]["forwards"] == int(cli_stats.group(1))
    assert body["specstream"]["tokens_per_forward"] == pytest.approx(float(cli_stats.group(2)), abs=6e-4)

    status, events = stream(server.port, CHAT, chat_body(prompt, max_tokens=24, temperature=0))
    assert status == 200 and streamed_text(events) == expected


def test_stream_events(server):
    body = chat_body("Stream this.", max_tokens=12, temperature=0,
                     stream_options={"include_usage": True})
    status, events = stream(server.port, CHAT, body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    last = final_chunk(events)
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    stats = last["specstream"]
    assert stats["forwards"] >= 1 and stats["tokens_per_forward"] >= 1.0
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []

    status, whole = request(server.port, "POST", CHAT, dict(body, stream=False))
    assert streamed_text(events) == whole["choices"][0]["message"]["content"]
    assert usage_chunk["usage"] == whole["usage"]


def test_completions_endpoint(server, loaded):
    from specstream_mlx.generate import encode_prompt

    prompt = "Once upon a time"
    expected = reference(loaded, prompt, 16, chat=False)
    status, body = request(server.port, "POST", COMPLETIONS,
                           {"prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected
    status, events = stream(server.port, COMPLETIONS, {"prompt": prompt, "max_tokens": 16})
    assert status == 200 and streamed_text(events) == expected
    ids = encode_prompt(loaded[1], prompt)
    status, body = request(server.port, "POST", COMPLETIONS, {"prompt": ids, "max_tokens": 16})
    assert status == 200 and body["choices"][0]["text"] == expected


def test_stop_sequences(server, loaded):
    prompt = "Write a list of fruits."
    full = reference(loaded, prompt, 40)
    # A 3-character stop string whose first occurrence is a few characters in.
    start = next(i for i in range(4, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[start:start + 3]
    for stops in (stop, ["\x00never", stop]):
        body = chat_body(prompt, max_tokens=40, temperature=0, stop=stops)
        status, out = request(server.port, "POST", CHAT, body)
        assert status == 200
        assert out["choices"][0]["message"]["content"] == full[:start]
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] < 40
        status, events = stream(server.port, CHAT, body)
        assert streamed_text(events) == full[:start]
        assert final_chunk(events)["choices"][0]["finish_reason"] == "stop"
    # A stop string that never appears changes nothing.
    body = chat_body(prompt, max_tokens=40, temperature=0, stop="\x00never")
    status, events = stream(server.port, CHAT, body)
    assert streamed_text(events) == full


BAD_REQUESTS = [
    (CHAT, b"{not json", None),
    (CHAT, b"[1, 2]", None),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (CHAT, chat_body("x", temperature="hot"), "temperature"),
    (CHAT, chat_body("x", temperature=5), "temperature"),
    (CHAT, chat_body("x", top_p=True), "top_p"),
    (CHAT, chat_body("x", max_tokens=1.5), "max_tokens"),
    (CHAT, chat_body("x", max_tokens=0), "max_tokens"),
    (CHAT, chat_body("x", max_tokens=100_000), "max_tokens"),
    (CHAT, chat_body("x", stop=5), "stop"),
    (CHAT, chat_body("x", stop=["a", "b", "c", "d", "e"]), "stop"),
    (CHAT, chat_body("x", stop=""), "stop"),
    (CHAT, chat_body("x", stream="yes"), "stream"),
    (CHAT, chat_body("x", seed="1"), "seed"),
    (CHAT, chat_body("x", n=2), "n"),
    (CHAT, chat_body("x", model=3), "model"),
    (CHAT, chat_body("x" * 3000), "messages"),
    (COMPLETIONS, {"prompt": 7}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "echo": True}, "echo"),
    (COMPLETIONS, {"prompt": [10**6]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_requests_get_400(server, path, body, param):
    raw = body if isinstance(body, bytes) else None
    status, out = request(server.port, "POST", path, body=None if raw else body, raw=raw)
    assert status == 400
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


def test_context_overflow_says_what_to_do(server):
    status, out = request(server.port, "POST", CHAT, chat_body("x", max_tokens=100_000))
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert "lower max_tokens to at most" in out["error"]["message"]


def test_other_http_errors(server):
    port = server.port
    assert request(port, "GET", "/v1/nothing")[0] == 404
    assert request(port, "GET", CHAT)[0] == 405
    status, out = request(port, "POST", CHAT, raw=json.dumps(chat_body("x")).encode(),
                          headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in out["error"]["message"]
    status, out = request(port, "GET", "/health", headers={"Host": "attacker.example:80"})
    assert status == 403 and out["error"]["code"] == "bad_host"
    assert request(port, "GET", "/health", headers={"Host": f"localhost:{port}"})[0] == 200
    assert health(server)["status"] == "ok"


def test_16_concurrent_clients_with_queue_bound_4(server, loaded):
    prompts = [f"Client {i}: tell me about the number {i * 7}." for i in range(16)]
    expected = [reference(loaded, p, 24) for p in prompts]
    assert len(set(expected)) == 16  # distinct answers, so a leak would show
    before = health(server)["queue"]["completed"]
    barrier = threading.Barrier(16)
    results = [None] * 16

    def client(i):
        body = chat_body(prompts[i], max_tokens=24, temperature=0)
        barrier.wait()
        if i % 2:
            status, events = stream(server.port, CHAT, body)
            results[i] = (status, streamed_text(events) if status == 200 else events[0])
        else:
            status, out = request(server.port, "POST", CHAT, body)
            results[i] = (status, out["choices"][0]["message"]["content"] if status == 200 else out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    served = [i for i, r in enumerate(results) if r and r[0] == 200]
    refused = [i for i, r in enumerate(results) if r and r[0] == 429]
    assert len(served) + len(refused) == 16, results
    for i in served:
        assert results[i][1] == expected[i], f"client {i} got another text"
    for i in refused:
        error = results[i][1]["error"]
        assert error["code"] == "queue_full" and "--max-queue" in error["message"]
    print(f"\n16 clients, queue bound 4: {len(served)} served, {len(refused)} refused (429)")
    assert len(served) >= 5 and refused  # 1 generating + 4 waiting fit; the rest do not
    after = health(server)
    assert after["queue"]["completed"] == before + len(served)
    assert after["queue"]["waiting"] == 0 and after["queue"]["failed"] == 0
    status, out = request(server.port, "POST", CHAT, chat_body(prompts[0], max_tokens=24, temperature=0))
    assert status == 200 and out["choices"][0]["message"]["content"] == expected[0]


def _wait_cancelled(server, count, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = health(server)["queue"]
        if queue["cancelled"] >= count and not queue["busy"]:
            return queue
        time.sleep(0.05)
    raise AssertionError(f"generation was not cancelled: {health(server)}")


def _open_stream(server, body, events=4):
    """Start a streaming request and read a few events; returns the open response."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", CHAT, body=json.dumps(dict(body, stream=True)),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen = 0
    while seen < events:
        seen += resp.readline().startswith(b"data: ")
    return conn, resp


def _send_and_leave(server, body, wait=0.3):
    """Send a non-streaming request and hang up before the answer."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps(dict(body, stream=False)).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(payload), payload))
    time.sleep(wait)
    sock.close()


def test_client_disconnect_stops_generation(server):
    before = health(server)["queue"]
    body = chat_body("Go on for a long time.", max_tokens=2000, temperature=0)
    # A streaming client leaves mid-stream while a second one waits in the queue
    # and leaves too: both are dropped, neither runs to the end.
    conn, resp = _open_stream(server, body)
    _send_and_leave(server, body)
    assert health(server)["queue"]["busy"]
    resp.close()
    conn.close()
    tic = time.monotonic()
    _wait_cancelled(server, before["cancelled"] + 2)
    stopped_after = time.monotonic() - tic
    # A non-streaming client leaves while its request generates.
    _send_and_leave(server, body, wait=0.5)
    after = _wait_cancelled(server, before["cancelled"] + 3)
    assert after["completed"] == before["completed"] and after["failed"] == 0
    assert stopped_after < 10  # 2000 tokens would take far longer


def test_soak_200_sequential_requests(server):
    prompts = [f"Soak prompt number {k}." for k in range(4)]
    first_text, samples, peaks = {}, [], []
    for i in range(200):
        k = i % 4
        body = chat_body(prompts[k], max_tokens=8, temperature=0)
        if i % 2:
            status, events = stream(server.port, CHAT, body)
            text, stats = streamed_text(events), final_chunk(events)["specstream"]
        else:
            status, out = request(server.port, "POST", CHAT, body)
            text, stats = out["choices"][0]["message"]["content"], out["specstream"]
        assert status == 200
        assert text == first_text.setdefault(k, text)  # no state carried between requests
        peaks.append(stats["peak_memory_gb"] * 1e3)
        samples.append(dict(server.memory_kb(), **health(server)["queue"]["memory"]))
    early, end = samples[19], samples[-1]
    growth_kb = end["VmHWM"] - early["VmHWM"]
    print(f"\nsoak: VmHWM after 20 requests {early['VmHWM']} kB, after 200 {end['VmHWM']} kB "
          f"(+{growth_kb} kB); VmRSS {early['VmRSS']} -> {end['VmRSS']} kB; threads "
          f"{early['Threads']} -> {end['Threads']}; MLX active after a request "
          f"{early['active_mb']:.3f} -> {end['active_mb']:.3f} MB; MLX peak per request "
          f"{min(peaks[:20]):.3f}-{max(peaks[:20]):.3f} MB (first 20), "
          f"{min(peaks[20:]):.3f}-{max(peaks[20:]):.3f} MB (rest)")
    assert growth_kb < 2048  # process peak memory: flat after the first 20
    assert end["active_mb"] <= early["active_mb"] + 0.05  # no MLX arrays kept between requests
    # Per-request MLX peaks vary by ~0.1 MB with the allocator's cache; no trend.
    assert max(peaks[20:]) <= max(peaks[:20]) + 0.25
    assert end["Threads"] <= early["Threads"] + 2


def test_openai_client(server, loaded):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "Hello from the OpenAI client."
    expected = reference(loaded, prompt, 16)
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.model_extra["specstream"]["tokens_per_forward"] >= 1.0
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    text = client.completions.create(model="m", prompt="Once", max_tokens=8, temperature=0)
    assert text.choices[0].text == reference(loaded, "Once", 8, chat=False)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=messages, max_tokens=100_000)
    assert [m.id for m in client.models.list()] == [reply.model]


def test_api_key_and_sigterm(checkpoint):
    srv = ServerProcess(checkpoint, env={"SPECSTREAM_API_KEY": "s3cret"})
    try:
        status, out = request(srv.port, "GET", "/v1/models")
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert request(srv.port, "POST", CHAT, chat_body("x"), headers=wrong)[0] == 401
        right = {"Authorization": "Bearer s3cret"}
        status, out = request(srv.port, "POST", CHAT, chat_body("x", max_tokens=4), headers=right)
        assert status == 200 and out["usage"]["completion_tokens"] >= 1
        # SIGTERM while a stream is being generated: a clean exit all the same.
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", CHAT, body=json.dumps(chat_body("x", max_tokens=2000, stream=True)),
                     headers=dict(right, **{"Content-Type": "application/json"}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()


def test_watch_stdin_exits_when_the_parent_goes(checkpoint):
    srv = ServerProcess(checkpoint, "--watch-stdin")
    assert health(srv)["status"] == "ok"
    srv.proc.stdin.close()
    assert srv.proc.wait(20) == 0


def _serve_error(*args) -> str:
    """Run ``serve`` in-process with bad input; its one-line error message."""
    from typer.testing import CliRunner

    from specstream_mlx.cli import app

    result = CliRunner().invoke(app, ["serve", *args])
    err = result.output.strip()
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_command_line(tmp_path, checkpoint, server):
    # One real process: a wrong model path ends it with one line, no traceback.
    run = subprocess.run([sys.executable, "-m", "specstream_mlx", "serve", "--model",
                          str(tmp_path / "missing"), "--port", "0"], capture_output=True, timeout=60)
    err = run.stderr.decode().strip()
    assert run.returncode == 1 and len(err.splitlines()) == 1 and "does not exist" in err, err
    assert "--port" in _serve_error("--model", str(checkpoint), "--port", str(server.port))
    assert "--max-queue" in _serve_error("--model", str(checkpoint), "--max-queue", "-1")
    assert "--port" in _serve_error("--model", str(checkpoint), "--port", "70000")
