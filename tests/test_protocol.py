"""Request validation, stop sequences and prompt formatting: no model, no HTTP."""

from __future__ import annotations

import random

import pytest

from specstream_mlx.prompts import format_messages, format_prompt
from specstream_mlx.serve.protocol import APIError, Responses, parse_request, resolve_max_tokens
from specstream_mlx.serve.stops import StopMatcher


def _expected(text, stops, cuts):
    """Generation stops after the first piece whose text contains a stop string."""
    for end in cuts + [len(text)]:
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)]
    return text


def _run_matcher(text, stops, cuts):
    matcher, out, stopped = StopMatcher(stops), [], False
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for piece in pieces:
        safe, stopped = matcher.feed(piece)
        out.append(safe)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_stop_matcher_matches_a_plain_search_for_any_split():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(0, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        got, stopped = _run_matcher(text, stops, cuts)
        assert got == _expected(text, stops, cuts), (text, stops, cuts)
        assert stopped == (got != text or any(s in text for s in stops))


def test_stop_matcher_holds_back_a_possible_start():
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("hello </e") == ("hello ", False)
    assert matcher.feed("xtra") == ("</extra", False)
    assert matcher.feed(" </en") == (" ", False)
    assert matcher.feed("d> more") == ("", True)
    assert matcher.flush() == ""
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_parse_request_types_and_defaults():
    req = parse_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, chat=True)
    assert req.messages == [{"role": "user", "content": "ab"}]
    assert (req.temperature, req.top_p, req.max_tokens, req.stop, req.stream) == (0.0, 1.0, None, (), False)
    req = parse_request({"prompt": ["one prompt"], "stop": "x", "seed": 3, "stream": True,
                         "stream_options": {"include_usage": True}}, chat=False)
    assert (req.prompt, req.stop, req.seed, req.stream, req.include_usage) == ("one prompt", ("x",), 3, True, True)
    req = parse_request({"messages": [{"role": "user", "content": "x"}],
                         "max_completion_tokens": 7, "user": "ignored", "logit_bias": {}}, chat=True)
    assert req.max_tokens == 7
    for bad in ({"temperature": True}, {"max_tokens": True}, {"top_k": -1}, {"min_p": 2},
                {"stream_options": []}, {"logprobs": True}, {"seed": -1}):
        with pytest.raises(APIError) as err:
            parse_request(dict({"messages": [{"role": "user", "content": "x"}]}, **bad), chat=True)
        assert err.value.status == 400 and err.value.param == next(iter(bad))


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 100, 2048, 512) == 512
    assert resolve_max_tokens(None, 2000, 2048, 512) == 48
    assert resolve_max_tokens(48, 2000, 2048, 512) == 48
    assert resolve_max_tokens(None, 10, None, 512) == 512
    for requested, prompt in ((49, 2000), (None, 2048)):
        with pytest.raises(APIError) as err:
            resolve_max_tokens(requested, prompt, 2048, 512)
        assert err.value.code == "context_length_exceeded"


def test_response_shapes():
    chat = Responses(True, "m")
    full = chat.full("hi", "stop", {"prompt_tokens": 1}, {"forwards": 2})
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert full["specstream"] == {"forwards": 2} and full["id"].startswith("chatcmpl-")
    assert chat.chunk("x")["choices"][0]["delta"] == {"content": "x"}
    text = Responses(False, "m")
    assert text.chunk("x", "length")["choices"][0] == {
        "index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}


class _Templated:
    chat_template = "t"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class _Plain:
    chat_template = None


def test_prompt_formatting():
    assert format_prompt(_Templated(), "hi", "be brief") == "<system>be brief<user>hi<assistant>"
    assert format_prompt(_Templated(), "hi", ignore_chat_template=True) == "hi"
    assert format_prompt(_Plain(), "hi", "ignored") == "hi"
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert format_messages(_Plain(), two) == "system: s\nuser: u\nassistant:"
    assert format_messages(_Plain(), two[1:]) == "u"
