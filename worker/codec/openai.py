"""The OpenAI API on the worker: request bodies to model inputs, outputs to OpenAI's objects.

Three formats (see :mod:`shared.protocol`), read by :mod:`shared.openai_api`:

- ``openai.embeddings``: the texts (or token-id lists) go to the handler's
  ``preprocess`` as one list, so the request has one row per input and is
  batched with any other request; the output must be one vector per input
  (``[inputs, dim]``). The reply is OpenAI's embedding list, each vector as
  floats or as base64 of little-endian float32, cut to ``dimensions`` when
  asked (and scaled back to unit length when the model's vectors were unit
  length);
- ``openai.chat`` and ``openai.completions``: the messages, rendered by the
  handler's ``tokenizer.apply_chat_template`` when it has a chat template
  (else the messages themselves), or the prompt, go to ``preprocess``; the
  handler's ``predict_stream(x, parameters)`` yields text deltas. A
  :class:`TextContext` turns them into ``chat.completion.chunk`` (or
  ``text_completion``) objects, applies ``stop`` sequences across delta
  boundaries, and writes the final chunk, the usage chunk, or the whole
  completion (:mod:`worker.serve.streaming` drives it).

What a handler declares (read after ``load``): ``openai_routes``, a list of
``embeddings``, ``chat``, ``completions``; ``openai_parameters``, the sampling
parameters its ``predict_stream`` reads (``max_tokens``, ``temperature``,
``top_p``, ``seed``): any other one in a request is a 400, never ignored.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import torch.nn.functional as F

from shared import openai_api
from shared.errors import ModelFailure, ModelLoadError, RequestError
from shared.openai_api import EmbeddingsRequest, TextRequest
from worker import pytree
from worker.codec import jsonio, tensors
from worker.codec.inputs import InputSpec, check_body_size, prepare

JSON: Final = "application/json"
FINISH_REASONS: Final = ("stop", "length")
# Vectors whose norms are all this close to 1 are taken for unit length.
_UNIT_TOLERANCE: Final = 1e-3


def declared_routes(handler: object, streams: bool) -> list[str]:
    """The handler's ``openai_routes``, checked against what it can serve (ModelLoadError);
    ``streams``: whether it has ``predict_stream``."""
    declared = getattr(handler, "openai_routes", None)
    if declared is None:
        return []
    routes = [declared] if isinstance(declared, str) else declared
    if not isinstance(routes, list | tuple) or not all(r in openai_api.ROUTES for r in routes):
        raise ModelLoadError(
            f"openai_routes must list some of {', '.join(openai_api.ROUTES)}, got {declared!r}"
        )
    text = [r for r in routes if r != openai_api.EMBEDDINGS]
    if text and not streams:
        raise ModelLoadError(f"openai_routes {text}: the handler needs predict_stream")
    if openai_api.EMBEDDINGS in routes and streams:
        raise ModelLoadError(
            "openai_routes embeddings: a handler with predict_stream runs one request at a "
            "time; an embedder needs predict(batch)"
        )
    return list(routes)


def _prompt_tokens(inputs: Any) -> int:
    """Tokens in a prepared input: its attention mask's ones, else its first integer leaf."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        return int(inputs["attention_mask"].sum())
    for leaf in pytree.leaves(inputs):
        if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point():
            return int(leaf.numel())
    return 0


# --- embeddings ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingsContext:
    request: EmbeddingsRequest
    prompt_tokens: int


class EmbeddingsCodec:
    """``fmt == "openai.embeddings"``."""

    def __init__(self, spec: InputSpec, streams: bool) -> None:
        self.spec = spec
        self._streams = streams

    def decode(
        self, header: Mapping[str, Any], body: bytes | memoryview
    ) -> tuple[Any, EmbeddingsContext]:
        check_body_size(body, self.spec.max_bytes)
        request = openai_api.parse(openai_api.EMBEDDINGS, body)
        assert isinstance(request, EmbeddingsRequest)
        if self._streams:
            raise RequestError(
                f"model {request.model!r} streams text (predict_stream): it serves "
                "/v1/chat/completions, not /v1/embeddings",
                param="model",
            )
        inputs = prepare(request.inputs, JSON, self.spec, "input")
        tokens = _prompt_tokens(inputs)
        if request.token_ids and not tokens:
            tokens = sum(len(ids) for ids in request.inputs)
        return inputs, EmbeddingsContext(request, tokens)

    def encode(self, context: EmbeddingsContext, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        request = context.request
        vectors = _vectors(result, len(request.inputs))
        if request.dimensions is not None:
            vectors = _shorten(vectors, request.dimensions)
        if request.encoding_format == "base64":
            rows: list[Any] = [
                base64.b64encode(tensors.to_bytes(row.contiguous())).decode() for row in vectors
            ]
        else:
            rows = list(vectors.numpy())
        document = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": row}
                for index, row in enumerate(rows)
            ],
            "model": request.model,
            "usage": {
                "prompt_tokens": context.prompt_tokens,
                "total_tokens": context.prompt_tokens,
            },
        }
        return jsonio.dump(document), "json", {}


def _vectors(result: Any, count: int) -> torch.Tensor:
    """The output as a float32 ``[count, dim]`` tensor on the host; ModelFailure if it is not."""
    try:
        vectors = torch.as_tensor(result) if not isinstance(result, torch.Tensor) else result
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelFailure(f"an embedding handler returns one vector per input: {exc}") from exc
    if vectors.ndim != 2 or vectors.shape[0] != count or not vectors.is_floating_point():
        raise ModelFailure(
            f"an embedding handler returns one vector per input ({count} floating-point "
            f"rows); it returned {vectors.dtype} of shape {list(vectors.shape)}"
        )
    return tensors.host(vectors).float()


def _shorten(vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
    """The first ``dimensions`` components, back to unit length if the vectors were."""
    if dimensions > vectors.shape[1]:
        raise RequestError(
            f"dimensions {dimensions} exceeds the model's {vectors.shape[1]}", param="dimensions"
        )
    unit = bool(torch.all((vectors.norm(dim=1) - 1).abs() < _UNIT_TOLERANCE))
    short = vectors[:, :dimensions]
    return F.normalize(short, dim=1) if unit else short


# --- chat and completions ---------------------------------------------------------------


def chat_template_of(handler: object) -> Callable[[list[dict[str, str]]], str] | None:
    """The handler's ``tokenizer.apply_chat_template`` as messages -> prompt text, when its
    tokenizer has a chat template; else None."""
    tokenizer = getattr(handler, "tokenizer", None)
    apply = getattr(tokenizer, "apply_chat_template", None)
    if not callable(apply) or not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        try:
            text = apply(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise RequestError(
                f"the chat template refused the messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc
        if not isinstance(text, str):
            raise ModelFailure(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    return render


class TextCodec:
    """``fmt == "openai.chat"`` or ``"openai.completions"``."""

    def __init__(self, spec: InputSpec, route: str, handler: object, streams: bool) -> None:
        self.spec = spec
        self.route = route
        self._streams = streams
        self._declared = frozenset(getattr(handler, "openai_parameters", None) or ())
        self._template = chat_template_of(handler)

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, Any]:
        check_body_size(body, self.spec.max_bytes)
        request = openai_api.parse(self.route, body)
        assert isinstance(request, TextRequest)
        path = openai_api.PATHS[self.route]
        if not self._streams:
            raise RequestError(
                f"model {request.model!r} does not generate text (its handler has no "
                f"predict_stream): it cannot serve {path}",
                param="model",
            )
        for name in request.parameters:
            if name in openai_api.SAMPLING and name not in self._declared:
                takes = ", ".join(sorted(self._declared)) or "none"
                raise RequestError(
                    f"model {request.model!r} does not take {name} (its handler's "
                    f"openai_parameters: {takes})",
                    param=name,
                )
        payload: Any
        if request.messages is not None:
            payload = (
                request.messages if self._template is None else self._template(request.messages)
            )
            what = "messages"
        else:
            payload, what = request.prompt, "prompt"
        inputs = prepare(payload, JSON, self.spec, what)
        return inputs, TextContext(request, _prompt_tokens(inputs))

    def encode(self, context: TextContext, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        """The whole completion (the outputs were fed to ``context`` as they came)."""
        return context.whole(), "json", {}


def _delta(item: Any) -> tuple[str, int, str | None]:
    """(text, tokens, finish_reason) of one yielded output: a str, or a dict with
    ``text`` and optionally ``tokens`` (default 1) and ``finish_reason``."""
    if isinstance(item, str):
        return item, 1 if item else 0, None
    if isinstance(item, Mapping):
        text = item.get("text", "")
        tokens = item.get("tokens", 1 if text else 0)
        finish = item.get("finish_reason")
        if isinstance(text, str) and isinstance(tokens, int) and finish in (None, *FINISH_REASONS):
            return text, tokens, finish
    raise ModelFailure(
        "a chat handler's predict_stream yields text (str), or a dict with text, tokens "
        f"and finish_reason ('stop' or 'length'); it yielded {type(item).__name__}"
    )


@dataclass(eq=False)
class TextContext:
    """One chat or completions request's answer, built as its outputs come.

    :meth:`feed` takes each output and returns the chunk to send (stream) or
    None; ``done`` turns true once a stop sequence or the handler ends it.
    :meth:`tail` is what a stream sends after the last output, :meth:`whole`
    the answer of a request that does not stream.
    """

    request: TextRequest
    prompt_tokens: int
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    done: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    _parts: list[str] = field(default_factory=list)
    _held: str = ""  # text that may be the start of a stop sequence
    _first: bool = True

    @property
    def parameters(self) -> dict[str, Any]:
        """What ``predict_stream(x, parameters)`` receives."""
        return self.request.parameters

    @property
    def chat(self) -> bool:
        return self.request.route == openai_api.CHAT

    def feed(self, item: Any) -> bytes | None:
        text, tokens, finish = _delta(item)
        self.completion_tokens += tokens
        if finish is not None:
            self.finish_reason, self.done = finish, True
        text = self._cut_at_stop(text)
        if not text:
            return None
        self._parts.append(text)
        return self._chunk(text, None) if self.request.stream else None

    def tail(self) -> list[bytes]:
        """The last chunks of a stream: held text, the finish reason, the usage if asked."""
        chunks = []
        if self._held:
            self._parts.append(self._held)
            chunks.append(self._chunk(self._held, None))
            self._held = ""
        chunks.append(self._chunk(None, self._finish()))
        if self.request.include_usage:
            chunks.append(
                self._dump({**self._head(chunk=True), "choices": [], "usage": self._usage()})
            )
        return chunks

    def whole(self) -> bytes:
        text = "".join(self._parts) + self._held
        finish = self._finish()
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._dump({**self._head(chunk=False), "choices": [choice], "usage": self._usage()})

    # --- pieces ---------------------------------------------------------------------

    def _cut_at_stop(self, text: str) -> str:
        """The text that can be sent now: up to a stop sequence (then ``done``), less any
        ending that may still grow into one."""
        stops = self.request.parameters.get("stop")
        if not stops:
            return text
        held = self._held + text
        found = [index for index in (held.find(stop) for stop in stops) if index >= 0]
        if found:
            self._held = ""
            self.finish_reason, self.done = "stop", True
            return held[: min(found)]
        keep = 0
        for stop in stops:
            for size in range(min(len(stop) - 1, len(held)), keep, -1):
                if held.endswith(stop[:size]):
                    keep = size
                    break
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def _finish(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        limit = self.request.parameters.get("max_tokens")
        return "length" if limit is not None and self.completion_tokens >= limit else "stop"

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            prefix = "chatcmpl-"
        else:
            kind, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + self.id,
            "object": kind,
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
        }

    def _chunk(self, text: str | None, finish: str | None) -> bytes:
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if self._first:
                delta = {"role": "assistant", **delta}
                self._first = False
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        document = {**self._head(chunk=True), "choices": [choice]}
        if self.request.include_usage:
            document["usage"] = None
        return self._dump(document)

    @staticmethod
    def _dump(document: dict[str, Any]) -> bytes:
        return jsonio.dump(document)
