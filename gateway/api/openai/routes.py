"""The OpenAI API's routes, answered as plain ASGI ahead of FastAPI (as ``/predict`` is).

    GET  /v1/models                 the served models, OpenAI's list object
    GET  /v1/models/{model}         one of them (404 when it is not served)
    POST /v1/embeddings             one vector per input, batched like any request
    POST /v1/chat/completions       a chat completion, or with ``stream`` its chunks
    POST /v1/completions            a text completion, or its chunks

The gateway reads only the body's ``model`` and ``stream``
(:func:`shared.openai_api.envelope`); the body goes to a worker untouched,
whose codec (:mod:`worker.codec.openai`) checks the rest (its 400s come back
in the same shape) and makes the answer.
A stream is written by :func:`gateway.api.sse.write_stream`, so it keeps the
streaming rules of ``/predict``: credit after each write, the worker told at
once when the client leaves or the deadline passes, no retry once output was
sent. It ends with ``data: [DONE]``; an error after the first chunk is an
``event: error`` whose data is OpenAI's error object, which the ``openai``
client raises.

A model serves the routes its ``openai`` setting names, else those its
handler's ``openai_routes`` declares (its ready workers said which in READY).
API keys are the server's ``--api-key``, sent as ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.types import Receive, Scope, Send

from gateway.api.auth import require_api_key
from gateway.api.http import (
    JSON,
    read_body,
    request_headers,
    run_request,
    send_response,
    timeout_header,
)
from gateway.api.openai import errors
from gateway.api.predict import Observer
from gateway.api.sse import Framing, write_stream
from shared import openai_api, protocol
from shared.errors import (
    ClientClosed,
    ModelNotFound,
    PayloadTooLarge,
    RequestError,
    TorchpoolError,
)

if TYPE_CHECKING:
    from gateway.pool.model import ModelRuntime
    from gateway.pool.runtime import Runtime

PREFIX: Final = "/v1/"
MODELS: Final = "/v1/models"
MODEL: Final = "/v1/models/{model}"  # as metrics label it
_MODELS_PREFIX: Final = MODELS + "/"
_UNKNOWN: Final = "/v1/{unknown}"
_FORMATS: Final = {
    openai_api.EMBEDDINGS: protocol.FMT_OPENAI_EMBEDDINGS,
    openai_api.CHAT: protocol.FMT_OPENAI_CHAT,
    openai_api.COMPLETIONS: protocol.FMT_OPENAI_COMPLETIONS,
}
_JSON: Final = JSON.encode()
_NO_MODEL_LIMIT: Final = 1 << 20  # with no model served, enough to read the 404's name
_BY_PATH: Final = {path: route for route, path in openai_api.PATHS.items()}
_EMPTY: Final = 'empty body; send a JSON request such as {"model": ..., "input": ...}'

FRAMING: Final = Framing(
    end=b"data: [DONE]\n\n",
    error_json=errors.error_json,
    send_error=errors.send_error,
)


def served_routes(model: ModelRuntime) -> Sequence[str] | None:
    """The OpenAI routes ``model`` serves; None while unknown (no worker ready to say)."""
    configured = model.settings.openai
    if configured is not None:
        return configured
    for worker in model.pool.serving():
        # Every worker of a model runs the same handler: the first ready one says.
        if worker.ready:
            declared = (worker.signature or {}).get("openai")
            return declared if isinstance(declared, list) else []
    return None


class OpenAIHandler:
    """Answers every request under ``/v1/`` (see the module docstring)."""

    def __init__(
        self, runtime_of: Callable[[], Runtime], api_keys: list[bytes], observe: Observer
    ) -> None:
        self._runtime_of = runtime_of
        self._keys = api_keys
        self._observe = observe
        # When each model was first listed: OpenAI's ``created``, steady across calls.
        self._created: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = _BY_PATH.get(path)
        label = path if route is not None else _label(path)
        status = 200
        served = ""
        try:
            headers = request_headers(scope)  # one pass, as /predict reads them
            declared, timeout = headers.content_length, headers.timeout
            try:
                if self._keys:
                    require_api_key(headers.authorization, self._keys)
                runtime = self._runtime_of()
                if route is None:
                    if label == _UNKNOWN:
                        status = await _plain_error(send, 404, f"unknown path {path}")
                    else:
                        status = await self._models(scope, send, runtime)
                    return
                if scope["method"] != "POST":
                    status = await _plain_error(send, 405, f"use POST for {path}", "POST")
                    return
                # The model is named inside the body: read up to the largest model's limit.
                limits = (m.settings.max_body_bytes for m in runtime.models.values())
                limit = max(limits, default=_NO_MODEL_LIMIT)
                body = await read_body(receive, declared, limit, _EMPTY)
                name, stream = openai_api.envelope(body)
                model = _model(runtime, name, route)
                served = model.name
                if len(body) > model.settings.max_body_bytes:
                    limit = model.settings.max_body_bytes
                    raise PayloadTooLarge(
                        f"body exceeds model {model.name}'s limit of {limit} bytes"
                    )
                timeout_s = timeout_header(timeout)
                fmt = _FORMATS[route]
                if stream and route != openai_api.EMBEDDINGS:
                    prepared = (fmt, body, timeout_s, protocol.RequestExtras())
                    status = await write_stream(model, receive, send, prepared, FRAMING)
                    return
                reply = await run_request(receive, model.dispatcher, fmt, body, timeout_s)
                await send_response(send, 200, reply.body, _JSON)
            except ClientClosed as exc:
                status = exc.status
            except TorchpoolError as exc:
                status = errors.status_of(exc)
                await errors.send_error(send, exc)
        except Exception:
            status = 500  # a torchpool bug: uvicorn answers 500 and logs the traceback
            raise
        finally:
            self._observe(label, status, time.perf_counter() - started, served)

    async def _models(self, scope: Scope, send: Send, runtime: Runtime) -> int:
        if scope["method"] != "GET":
            return await _plain_error(send, 405, f"use GET for {scope['path']}", "GET")
        path: str = scope["path"]
        if path == MODELS:
            listed = [self._describe(name) for name in runtime.models]
            document: dict[str, Any] = {"object": "list", "data": listed}
        else:
            name = path[len(MODELS) + 1 :]
            _model(runtime, name, None)
            document = self._describe(name)
        await send_response(send, 200, orjson.dumps(document), _JSON)
        return 200

    def _describe(self, name: str) -> dict[str, Any]:
        created = self._created.setdefault(name, int(time.time()))
        return {"id": name, "object": "model", "created": created, "owned_by": "torchpool"}


def _label(path: str) -> str:
    """The metrics route of a path that is none of the POST routes."""
    if path == MODELS:
        return MODELS
    return MODEL if path.startswith(_MODELS_PREFIX) else _UNKNOWN


def _model(runtime: Runtime, name: str, route: str | None) -> ModelRuntime:
    """The model served as ``name`` (404 listing the served ones), serving ``route``."""
    try:
        model = runtime.model(name)
    except ModelNotFound as exc:
        raise ModelNotFound(
            f"the model {name!r} does not exist; served: {runtime.served_names()}",
            param="model",
            models=list(runtime.models),
        ) from exc
    if route is None:
        return model
    routes = served_routes(model)
    if routes is not None and route not in routes:
        raise RequestError(
            f"model {name!r} does not serve {openai_api.PATHS[route]}; it serves "
            f"{', '.join(openai_api.PATHS[r] for r in routes) or 'no OpenAI route'} (a handler "
            "declares them in openai_routes, a config file in the model's openai key)",
            param="model",
        )
    return model


async def _plain_error(send: Send, status: int, message: str, allow: str = "") -> int:
    """A 404 for a path or a 405 (``allow``: the method to use), in OpenAI's shape."""
    code = "method_not_allowed" if allow else "unknown_url"
    error = {"message": message, "type": errors.INVALID_REQUEST, "param": None, "code": code}
    allowed = [(b"allow", allow.encode())] if allow else []
    await send_response(send, status, orjson.dumps({"error": error}), _JSON, allowed)
    return status
