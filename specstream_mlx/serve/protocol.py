"""OpenAI's request and response shapes: validation in, JSON objects out.

Pure functions and dataclasses, no model and no HTTP: the server calls
``parse_request`` on a decoded JSON body and the ``Responses`` builders on
the generated text. Fields OpenAI defines that do not change the output
(``user``, ``logit_bias`` ...) are accepted and ignored; fields that would
change its shape (``n > 1``, ``logprobs``, ``echo``) are refused with a 400.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from ..verify import SamplingError, SamplingParams

MAX_STOPS = 4
MAX_TEMPERATURE = 2.0  # OpenAI's API range; SamplingParams itself has no upper bound
# SamplingParams field -> the request field that sets it
SAMPLING_FIELDS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error to send as an OpenAI-style JSON body.

    Args:
        status: HTTP status code.
        message: what went wrong and what to do.
        param: the offending request field, if any.
        code: a short machine-readable code, if any.
        kind: OpenAI's error ``type``.
    """

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """``{"error": {...}}`` as OpenAI's API returns it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param)


def _number(body: dict, name: str, default, high: Optional[float] = None):
    """A JSON number; its range is ``SamplingParams``' to check (``high``: an API cap)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"expected a number, got {type(value).__name__}")
    if high is not None and value > high:
        raise _bad(name, f"must be at most {high}, got {value}")
    return float(value)


def _integer(body: dict, name: str, default, low: Optional[int] = None,
             high: Optional[int] = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise _bad(name, f"must be {bound}, got {value}")
    return value


def _sampling(body: dict, default_temperature: float) -> SamplingParams:
    """The request's sampling settings: JSON types checked here, ranges by ``SamplingParams``."""
    given = {
        "temp": _number(body, "temperature", default_temperature, high=MAX_TEMPERATURE),
        "top_p": _number(body, "top_p", None),
        "top_k": _integer(body, "top_k", None),
        "min_p": _number(body, "min_p", None),
    }
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})
    except SamplingError as exc:
        raise APIError(400, str(exc), param=SAMPLING_FIELDS[exc.field]) from None


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {type(value).__name__}")
    return value


def _stops(body: dict) -> Tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop", "expected a string or a list of strings")
    if len(value) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop sequences, got {len(value)}")
    if any(s == "" for s in value):
        raise _bad("stop", "stop sequences must be non-empty strings")
    return tuple(value)


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(where, "only text content is supported: give a string or "
                                  "a list of {\"type\": \"text\", \"text\": ...} parts")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(where, f"expected a string, got {type(content).__name__}")


def _messages(body: dict) -> List[Dict[str, str]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "expected a non-empty list of {\"role\", \"content\"} objects")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        messages.append({"role": role, "content": _text_content(m.get("content"), f"{where}.content")})
    return messages


def _prompt(body: dict) -> Union[str, List[int]]:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return value
    raise _bad("prompt", "expected a non-empty string or a list of token ids "
                         "(one prompt per request)")


def _refuse_unsupported(body: dict, chat: bool) -> None:
    _integer(body, "n", 1, 1, 1)
    if chat and body.get("logprobs") not in (None, False):
        raise _bad("logprobs", "log probabilities are not supported; leave it out")
    if not chat:
        if body.get("logprobs") not in (None, 0):
            raise _bad("logprobs", "log probabilities are not supported; leave it out")
        if _flag(body, "echo"):
            raise _bad("echo", "echo is not supported; leave it out")
        _integer(body, "best_of", 1, 1, 1)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"expected a string, got {type(model).__name__}")


@dataclass
class ParsedRequest:
    """A validated completion request.

    Attributes:
        chat: ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``).
        messages: the chat messages (chat only).
        prompt: prompt text or token ids (completions only).
        max_tokens: the requested limit, or ``None`` for the server's default.
        sampling: temperature, top_p, top_k, min_p (``verify.SamplingParams``,
            carried unchanged to the decoder).
        seed: seeds MLX's generator for this request, or ``None``.
        stop: stop strings.
        stream: answer with server-sent events.
        include_usage: send a usage chunk before ``[DONE]`` when streaming.
    """

    chat: bool
    messages: List[Dict[str, str]] = field(default_factory=list)
    prompt: Union[str, List[int], None] = None
    max_tokens: Optional[int] = None
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_request(body: Any, chat: bool, default_temperature: float = 0.0) -> ParsedRequest:
    """Validate a decoded JSON body.

    Args:
        body: the decoded JSON.
        chat: the chat endpoint (``messages``) rather than completions (``prompt``).
        default_temperature: used when the request gives none.

    Returns:
        The request's settings.

    Raises:
        APIError: (400) a missing field, a field of the wrong type or out of
            range (sampling ranges: ``SamplingParams``' message, ``param`` the
            request field).
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _refuse_unsupported(body, chat)
    max_tokens = _integer(body, "max_tokens", None, 1)
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", f"expected an object, got {type(options).__name__}")
    return ParsedRequest(
        chat=chat,
        messages=_messages(body) if chat else [],
        prompt=None if chat else _prompt(body),
        max_tokens=max_tokens,
        sampling=_sampling(body, default_temperature),
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
        stop=_stops(body),
        stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage"),
    )


def resolve_max_tokens(requested: Optional[int], prompt_tokens: int,
                       context: Optional[int], default: int) -> int:
    """The token limit for a request, checked against the model's context.

    Raises:
        APIError: (400) the prompt plus ``requested`` does not fit the context.
    """
    if context is not None and prompt_tokens >= context:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, which fills the "
                            f"model's context of {context} tokens: shorten it",
                       param="messages", code="context_length_exceeded")
    if requested is None:
        return default if context is None else min(default, context - prompt_tokens)
    if context is not None and prompt_tokens + requested > context:
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({requested}) "
                            f"exceeds the model's context of {context} tokens: lower "
                            f"max_tokens to at most {context - prompt_tokens}",
                       param="max_tokens", code="context_length_exceeded")
    return requested


class Responses:
    """Builds the JSON objects of one completion (whole or streamed).

    Args:
        chat: chat completion objects rather than text completion objects.
        model: the model id to report.
    """

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.model, "choices": choices}

    def full(self, text: str, finish: str, usage: dict, stats: dict) -> dict:
        """The non-streaming response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            out = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = self._envelope("text_completion", [choice])
        return dict(out, usage=usage, specstream=stats)

    def chunk(self, text: Optional[str], finish: Optional[str] = None,
              stats: Optional[dict] = None, first: bool = False) -> dict:
        """One streamed chunk; the last carries ``finish`` and the stats."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._envelope("text_completion", [choice])
        if stats is not None:
            out["specstream"] = stats
        return out

    def usage_chunk(self, usage: dict) -> dict:
        """The extra chunk ``stream_options.include_usage`` asks for."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return dict(self._envelope(obj, []), usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
