"""The OpenAI API's request bodies, read and checked once for the gateway and the worker.

    POST /v1/embeddings         -> EmbeddingsRequest
    POST /v1/chat/completions   -> TextRequest (route "chat": messages)
    POST /v1/completions        -> TextRequest (route "completions": one prompt)

The gateway reads only a body's envelope here (:func:`envelope`: its model
and whether it streams), so its per-request work stays that of ``/predict``;
it passes the body to a worker untouched, whose codec
(:mod:`worker.codec.openai`) reads and checks all of it (:func:`parse`).

A parameter torchpool does not implement is a 400 naming it, never silently
ignored. A few are taken at the value that changes nothing (``n: 1``,
``presence_penalty: 0``, ``logprobs: false``...), since clients send them
unasked; ``user`` is informational. A ``null`` value is the same as leaving
the key out. Every error is a :class:`shared.errors.RequestError` whose
``param`` detail names the offending field, as OpenAI's errors do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from shared.errors import RequestError

# Route names, as a handler's ``openai_routes`` and the ``openai`` setting spell them.
EMBEDDINGS: Final = "embeddings"
CHAT: Final = "chat"
COMPLETIONS: Final = "completions"
ROUTES: Final = (EMBEDDINGS, CHAT, COMPLETIONS)
PATHS: Final = {
    EMBEDDINGS: "/v1/embeddings",
    CHAT: "/v1/chat/completions",
    COMPLETIONS: "/v1/completions",
}

# Sampling parameters a chat handler reads only when it says so (``openai_parameters``);
# ``stop`` is applied by the worker to any handler's text, so it needs no declaration.
SAMPLING: Final = ("max_tokens", "temperature", "top_p", "seed")
# OpenAI's own limits.
MAX_EMBEDDING_INPUTS: Final = 2048
MAX_STOP_SEQUENCES: Final = 4
ENCODING_FORMATS: Final = ("float", "base64")
ROLES: Final = ("system", "developer", "user", "assistant")

# Taken only at the value that changes nothing: key -> that value.
_NO_OP: Final[Mapping[str, Any]] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "parallel_tool_calls": True,
}
_EMBEDDINGS_KEYS: Final = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_TEXT_KEYS: Final = frozenset(
    {"model", "stream", "stream_options", "user", "stop", "seed", "temperature", "top_p"}
    | {"max_tokens"}
)
_CHAT_KEYS: Final = _TEXT_KEYS | {"messages", "max_completion_tokens"}
_COMPLETIONS_KEYS: Final = _TEXT_KEYS | {"prompt"}


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    # Texts, or token-id lists: one per vector asked for.
    inputs: list[str] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None

    @property
    def token_ids(self) -> bool:
        return bool(self.inputs) and isinstance(self.inputs[0], list)


@dataclass(frozen=True)
class TextRequest:
    """A chat or completions request (``n`` is 1: one choice)."""

    route: str
    model: str
    # chat: [{"role", "content"}] with content as text; completions: None.
    messages: list[dict[str, str]] | None = None
    # completions: the prompt, a string or token ids; chat: None.
    prompt: str | list[int] | None = None
    stream: bool = False
    include_usage: bool = False
    # Only the keys given: max_tokens, temperature, top_p, seed, stop (a list).
    parameters: dict[str, Any] = field(default_factory=dict)


def _object(body: bytes | memoryview | str) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise RequestError("the body must be a JSON object")
    return document


def load(body: bytes | memoryview | str) -> dict[str, Any]:
    """A JSON object body, without its null values (the same as leaving a key out)."""
    return {key: value for key, value in _object(body).items() if value is not None}


def envelope(body: bytes | memoryview | str) -> tuple[str, bool]:
    """(model, stream) of a body: what the gateway needs to route it; 400 if unreadable."""
    document = _object(body)
    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    return _model(document), stream is True


def parse(route: str, body: bytes | memoryview | str) -> EmbeddingsRequest | TextRequest:
    """The request of ``route`` (one of :data:`ROUTES`) in ``body``."""
    document = load(body)
    if route == EMBEDDINGS:
        return parse_embeddings(document)
    return parse_text(route, document)


def parse_embeddings(document: dict[str, Any]) -> EmbeddingsRequest:
    _check_keys(document, _EMBEDDINGS_KEYS)
    model = _model(document)
    inputs = _embedding_inputs(document.get("input"))
    encoding = document.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        message = f"encoding_format must be 'float' or 'base64', got {encoding!r:.40}"
        raise _bad(message, "encoding_format")
    dimensions = document.get("dimensions")
    if dimensions is not None and not (_is_int(dimensions) and dimensions >= 1):
        raise _bad(f"dimensions must be a positive integer, got {dimensions!r:.40}", "dimensions")
    _check_user(document)
    return EmbeddingsRequest(model, inputs, encoding, dimensions)


def parse_text(route: str, document: dict[str, Any]) -> TextRequest:
    """A chat (``route`` "chat") or completions request."""
    _check_keys(document, _CHAT_KEYS if route == CHAT else _COMPLETIONS_KEYS)
    model = _model(document)
    stream = document.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    include_usage = False
    if "stream_options" in document:
        options = document["stream_options"]
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad('stream_options takes {"include_usage": true|false}', "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be true or false", "stream_options")
    _check_user(document)
    parameters = _sampling(document)
    if route == CHAT:
        messages = _messages(document.get("messages"))
        return TextRequest(route, model, messages, None, stream, include_usage, parameters)
    prompt = _prompt(document.get("prompt"))
    return TextRequest(route, model, None, prompt, stream, include_usage, parameters)


# --- pieces ------------------------------------------------------------------------


def _bad(message: str, param: str) -> RequestError:
    """A 400 about the request field ``param``."""
    return RequestError(message, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_keys(document: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in document.items():
        if key in allowed:
            continue
        if key in _NO_OP and value == _NO_OP[key] and type(value) is type(_NO_OP[key]):
            continue
        if key in _NO_OP:
            raise _bad(f"{key} must be {_NO_OP[key]!r} here (or left out)", key)
        raise _bad(f"parameter {key!r} is not supported by this server", key)


def _model(document: dict[str, Any]) -> str:
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: the name of a served model (GET /v1/models)", "model")
    return model


def _check_user(document: dict[str, Any]) -> None:
    if not isinstance(document.get("user", ""), str):
        raise _bad("user must be a string", "user")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) and v >= 0 for v in value)


def _embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad("input must be a string, a list of strings, or token ids", "input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise _bad(f"input holds {len(value)} items; at most {MAX_EMBEDDING_INPUTS}", "input")
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise _bad("input must not hold empty strings", "input")
        return list(value)
    if _token_ids(value):
        return [list(value)]
    if all(_token_ids(item) for item in value):
        return [list(item) for item in value]
    raise _bad(
        "input must be a string, a list of strings, a list of token ids (non-negative "
        "integers) or a list of such lists",
        "input",
    )


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(f"messages[{index}].content: only text parts are supported", "messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"messages[{index}].content: a text part needs text", "messages")
            texts.append(text)
        return "".join(texts)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty list of {role, content}", "messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}] must be an object with role and content", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r:.40}",
                "messages",
            )
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise _bad(f"messages[{index}]: {', '.join(extra)} not supported", "messages")
        messages.append({"role": role, "content": _content(message, index)})
    return messages


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str | list)):
        value = value[0]  # one prompt in a list, as clients often send it
    if isinstance(value, str) and value:
        return value
    if _token_ids(value):
        return list(value)
    if isinstance(value, list) and len(value) > 1 and not _token_ids(value):
        raise _bad("one prompt per request: send several requests for several", "prompt")
    raise _bad("prompt must be a non-empty string or a list of token ids", "prompt")


def _sampling(document: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters given, checked and under one name each."""
    parameters: dict[str, Any] = {}
    tokens = document.get("max_completion_tokens", document.get("max_tokens"))
    if tokens is not None:
        if not (_is_int(tokens) and tokens >= 1):
            key = "max_completion_tokens" if "max_completion_tokens" in document else "max_tokens"
            raise _bad(f"{key} must be a positive integer, got {tokens!r:.40}", key)
        parameters["max_tokens"] = tokens
    if "temperature" in document:
        value = document["temperature"]
        if not (_is_number(value) and 0 <= value <= 2):
            raise _bad(
                f"temperature must be a number from 0 to 2, got {value!r:.40}", "temperature"
            )
        parameters["temperature"] = float(value)
    if "top_p" in document:
        value = document["top_p"]
        if not (_is_number(value) and 0 < value <= 1):
            raise _bad(f"top_p must be a number in (0, 1], got {value!r:.40}", "top_p")
        parameters["top_p"] = float(value)
    if "seed" in document:
        if not _is_int(document["seed"]):
            raise _bad("seed must be an integer", "seed")
        parameters["seed"] = document["seed"]
    if "stop" in document:
        stop = document["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise _bad(
                f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty "
                "strings",
                "stop",
            )
        if stops:
            parameters["stop"] = list(stops)
    return parameters
