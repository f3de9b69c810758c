"""What every HTTP route shares: errors as responses, bodies, deadlines, readiness.

Each rule lives here once, for /predict (plain ASGI, see :mod:`gateway.api.predict`)
and the FastAPI routes alike (:mod:`gateway.api.app`, :mod:`gateway.api.v2`,
:mod:`gateway.api.admin`):

- the request headers torchpool reads, parsed from the scope in one pass;
- an error's extra headers: ``Retry-After`` on 503, ``WWW-Authenticate`` on 401;
- reading a body under ``--max-body-mb`` (413 as soon as it is known to be too big);
- ``X-Request-Timeout``;
- waiting for a worker's reply, dropping a queued request whose client left;
- the readiness rule of /health/ready and /v2/health/ready, from each model's
  own (:func:`gateway.pool.model.not_ready_reason`).

It imports nothing of the HTTP side and only the pool's dispatcher, request
types and readiness rule, so any route module can import it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.pool.dispatch import Dispatcher
from gateway.pool.model import not_ready_reason
from gateway.pool.pending import Pending, Reply
from shared import protocol
from shared.errors import (
    SHUTTING_DOWN,
    ClientClosed,
    PayloadTooLarge,
    RequestError,
    TorchpoolError,
    Unauthorized,
    Unavailable,
    v2_status,
)

if TYPE_CHECKING:
    from gateway.pool.runtime import Runtime

JSON: Final = "application/json"
TIMEOUT_HEADER: Final = "x-request-timeout"  # shortens this request's deadline, in seconds
_TIMEOUT_HEADER: Final = TIMEOUT_HEADER.encode()
BEARER_CHALLENGE: Final = 'Bearer realm="torchpool"'


def runtime_of(request: Request) -> Runtime:
    """The serving pool the app's lifespan started."""
    runtime: Runtime = request.app.state.runtime
    return runtime


@dataclass(slots=True)
class RequestHeaders:
    """The request headers torchpool reads, as they came (bytes); None when absent."""

    content_type: bytes | None = None
    content_length: bytes | None = None
    timeout: bytes | None = None  # X-Request-Timeout
    authorization: bytes | None = None
    accept: bytes | None = None


def request_headers(scope: Scope) -> RequestHeaders:
    """The headers of an ASGI ``scope`` that torchpool reads, in one pass over them.

    ASGI gives header names in lower case; a repeated header counts by its last value.
    """
    found = RequestHeaders()
    for name, value in scope["headers"]:
        if name == b"content-type":
            found.content_type = value
        elif name == b"content-length":
            found.content_length = value
        elif name == _TIMEOUT_HEADER:
            found.timeout = value
        elif name == b"authorization":
            found.authorization = value
        elif name == b"accept":
            found.accept = value
    return found


# --- errors -----------------------------------------------------------------------


def error_headers(error: TorchpoolError) -> dict[str, str]:
    """The headers an error's answer carries besides its JSON body."""
    if isinstance(error, Unavailable):
        return {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": BEARER_CHALLENGE}
    return {}


def json_response(
    document: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type=JSON, headers=headers)


def error_response(
    error: TorchpoolError, document: Any = None, status: int | None = None
) -> Response:
    """``error`` as an answer: its JSON (or ``document``), its status (or ``status``)."""
    body = error.to_json() if document is None else document
    return json_response(body, error.status if status is None else status, error_headers(error))


def v2_error_response(error: TorchpoolError) -> Response:
    """``error`` as the Open Inference Protocol answers it: its body, the /v2 status."""
    return error_response(error, error.to_v2_json(), v2_status(error))


# The JSON schema of an error body (TorchpoolError.to_json), for OpenAPI.
ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
# The same on the /v2 routes (TorchpoolError.to_v2_json): the message alone.
V2_ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": ERROR_SCHEMA["properties"]["error"]},
}


def errors_openapi(
    *statuses: int, schema: dict[str, Any] = ERROR_SCHEMA
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route answers, so clients know them."""
    return {
        str(status): {
            "description": HTTPStatus(status).phrase,
            "content": {JSON: {"schema": schema}},
        }
        for status in statuses
    }


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    media_type: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole answer on a plain ASGI ``send``; ``headers``: more than its type and length."""
    fixed = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": fixed + (headers or [])}
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: TorchpoolError) -> None:
    """:func:`error_response` on a plain ASGI ``send``."""
    headers = [(k.lower().encode(), v.encode()) for k, v in error_headers(error).items()]
    await send_response(send, error.status, orjson.dumps(error.to_json()), JSON.encode(), headers)


# --- requests -----------------------------------------------------------------------


def timeout_header(value: bytes | str | None) -> float | None:
    """``X-Request-Timeout`` in seconds; None when absent; 400 unless a positive number."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise RequestError(f"X-Request-Timeout must be a positive number of seconds, got {text!r}")
    return seconds


async def read_body(
    receive: Receive, declared: bytes | str | None, limit: int, empty: str
) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed ``limit``.

    ``declared`` is the Content-Length header; ``empty`` the 400 message for no body.
    """
    if isinstance(declared, str):
        declared = declared.encode()
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared.decode()} bytes exceeds the limit of {limit}")
    message = await receive()
    body: bytes = message.get("body", b"")
    if message.get("more_body"):
        chunks = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientClosed("the client closed the connection while sending")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
    elif message["type"] == "http.disconnect":
        raise ClientClosed("the client closed the connection while sending")
    if len(body) > limit:
        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    if not body:
        raise RequestError(empty)
    return body


async def run_request(
    receive: Receive,
    dispatcher: Dispatcher,
    fmt: str,
    body: bytes,
    timeout_s: float | None,
    fields: protocol.RequestExtras | None = None,
) -> Reply:
    """Hand a request to the dispatcher and wait for its reply.

    While it is queued, a client that disconnects takes it out of the queue
    (never run); once it is on a worker, the reply is awaited regardless.
    """
    pending = dispatcher.enqueue(fmt, body, timeout_s, fields)
    if not pending.queued:
        return await dispatcher.result(pending)
    # One watcher task, whose end answers the request ClientClosed; the reply is
    # awaited here, not in a second task (fewer tasks and futures per request).
    watcher = asyncio.ensure_future(disconnected(receive))
    watcher.add_done_callback(lambda w: _on_left(w, pending))
    try:
        return await dispatcher.result(pending)  # drops the request from the queue if there
    finally:
        watcher.cancel()


def _on_left(watcher: asyncio.Future[None], pending: Pending) -> None:
    if not watcher.cancelled():  # cancelled: the answer came first
        pending.settle(ClientClosed("the client closed the connection before the answer"))


async def disconnected(receive: Receive) -> None:
    """Returns once the client has gone (``http.disconnect``); reads nothing else."""
    while (await receive())["type"] != "http.disconnect":
        continue


# --- readiness --------------------------------------------------------------------


def server_not_ready_reason(runtime: Runtime) -> str | None:
    """Why the gateway does not take traffic (the readiness probes' rule); None when it does.

    Ready means every model has at least its min_ready workers ready.
    """
    if runtime.draining:
        return SHUTTING_DOWN
    several = len(runtime.models) > 1
    for model in runtime.models.values():
        reason = not_ready_reason(model.pool, model.settings.min_ready)
        if reason is not None:
            return f"model {model.name}: {reason}" if several else reason
    if not runtime.models:
        return "no model is served"
    return None
