"""Request validation, stop sequences and prompt formatting: no model, no HTTP."""

from __future__ import annotations

import random

import pytest

from specstream_mlx.prompts import format_messages, format_prompt
from specstream_mlx.serve.protocol import APIError, Responses, parse_request, resolve_max_tokens
from specstream_mlx.serve.stops import StopMatcher
from specstream_mlx.serve.worker import GenerationRequest
from specstream_mlx.verify import SamplingError, SamplingParams


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
    assert (req.sampling.temp, req.sampling.top_p, req.max_tokens, req.stop, req.stream) == (0.0, 1.0, None, (), False)
    assert req.sampling == SamplingParams() and req.seed is None
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


def _chat(**fields):
    return parse_request(dict({"messages": [{"role": "user", "content": "x"}]}, **fields), chat=True)


def test_the_request_builds_one_sampling_params():
    req = _chat(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1)
    assert req.sampling == SamplingParams(temp=0.7, top_p=0.9, top_k=40, min_p=0.05)
    assert GenerationRequest([1], 4, sampling=req.sampling).sampling is req.sampling
    assert GenerationRequest([1], 4).sampling == SamplingParams()  # greedy
    # mlx-lm's rule: top_p 0 and 1 are both off; SamplingParams stores 1.0 for both
    assert _chat(top_p=0).sampling == _chat(top_p=1).sampling == _chat().sampling
    assert SamplingParams(top_p=0.0).top_p == 1.0 and SamplingParams().top_p == 1.0
    assert parse_request({"prompt": "x"}, chat=False, default_temperature=0.6).sampling.temp == 0.6


@pytest.mark.parametrize("field,value,kwarg", [
    ("temperature", -0.5, "temp"), ("top_p", 1.5, "top_p"), ("top_p", -0.1, "top_p"),
    ("top_k", -1, "top_k"), ("min_p", 2, "min_p"), ("min_p", -1, "min_p"),
])
def test_sampling_ranges_are_checked_by_sampling_params(field, value, kwarg):
    with pytest.raises(SamplingError) as direct:
        SamplingParams(**{kwarg: value})
    assert isinstance(direct.value, ValueError) and direct.value.field == kwarg
    with pytest.raises(APIError) as err:
        _chat(**{field: value})
    assert err.value.status == 400 and err.value.param == field
    assert err.value.message == str(direct.value)


def test_api_limits_and_json_types_stay_in_the_protocol():
    for field, value in (("temperature", 2.5), ("temperature", "1"), ("top_p", True),
                         ("top_k", 2.0), ("min_p", "0.1")):
        with pytest.raises(APIError) as err:
            _chat(**{field: value})
        assert err.value.status == 400 and err.value.param == field
    assert _chat(temperature=2).sampling.temp == 2.0


def test_stream_generate_takes_sampling_or_the_keywords_not_both():
    from specstream_mlx.generate import stream_generate

    with pytest.raises(ValueError, match="not both"):
        next(stream_generate(None, None, "x", 4, sampling=SamplingParams(temp=1), temp=0.5))
    with pytest.raises(ValueError, match="not both"):
        next(stream_generate(None, None, "x", 4, sampling=SamplingParams(), top_p=1.0))
    with pytest.raises(ValueError, match="top-p"):
        next(stream_generate(None, None, "x", 4, temp=1, top_p=3))


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
