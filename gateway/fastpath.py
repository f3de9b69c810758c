"""``POST /predict`` as plain ASGI: the request path that carries the load.

Every /predict request would otherwise cross FastAPI's router, its middleware
stack and its per-request hooks before reaching a handler that only forwards
bytes. Profiles under load showed that frame work costing more gateway CPU
than the forward pass of a small model, so /predict is answered here, before
FastAPI, by a handler that reads the headers once, reads the body, hands it
to the dispatcher and writes the reply. The behaviour is the contract of
DESIGN.md and README.md, the same as every other route's: JSON errors with
their status from :mod:`shared.errors`, API keys, metrics, deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.auth import send_unauthorized, token_matches
from gateway.dispatch import Reply
from shared import protocol
from shared.errors import (
    ClientClosed,
    PayloadTooLarge,
    RequestError,
    TorchpoolError,
    Unavailable,
    UnsupportedMediaType,
)

PREDICT_PATH = "/predict"
TIMEOUT_HEADER = b"x-request-timeout"  # shortens this request's deadline, in seconds

JSON = b"application/json"
MSGPACK = b"application/msgpack"
_BODY_FORMATS = {
    JSON: protocol.FMT_JSON,
    MSGPACK: protocol.FMT_MSGPACK,
    b"application/x-msgpack": protocol.FMT_MSGPACK,
    b"application/vnd.msgpack": protocol.FMT_MSGPACK,
}
_MEDIA_TYPES = {protocol.FMT_JSON: JSON, protocol.FMT_MSGPACK: MSGPACK}

# (route, status, seconds) -> None
Observer = Callable[[str, int, float], None]


def body_format(content_type: bytes | None) -> str:
    """The wire format for a request's content type; 415 for anything else."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    fmt = _BODY_FORMATS.get(media)
    if fmt is None and media.endswith(b"+json"):
        fmt = protocol.FMT_JSON
    if fmt is None:
        shown = media.decode(errors="replace") or "none"
        raise UnsupportedMediaType(
            f"content type {shown!r} is not supported; send application/json "
            f"(or application/msgpack)"
        )
    return fmt


def timeout_header(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise RequestError(
            f"X-Request-Timeout must be a positive number of seconds, got {value.decode()!r}"
        )
    return seconds


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed ``limit``."""
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
        raise RequestError('empty body; send {"input_tensor": [[...], ...]}')
    return body


async def unless_client_leaves(receive: Receive, waiting: Awaitable[Reply]) -> Reply:
    """Wait for a queued request's reply, dropping it if the client disconnects first."""
    result = asyncio.ensure_future(waiting)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        result.cancel()  # Dispatcher.result drops the request from the queue
        raise ClientClosed("the client closed the connection before the answer")
    return result.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_response(
    send: Send, status: int, body: bytes, media_type: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: TorchpoolError) -> None:
    extra = []
    if isinstance(error, Unavailable):
        extra.append((b"retry-after", str(error.retry_after_s).encode()))
    await send_response(send, error.status, orjson.dumps(error.to_json()), JSON, extra)


class PredictHandler:
    """Answers one ``POST /predict``; the app calls it before FastAPI sees the request."""

    def __init__(
        self,
        runtime_of: Callable[[], Any],
        max_body_bytes: int,
        api_keys: list[bytes],
        observe: Observer,
    ) -> None:
        self._runtime_of = runtime_of
        self._limit = max_body_bytes
        self._keys = api_keys
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 200
        try:
            if scope["method"] != "POST":
                status = 405
                error = {"error": "use POST for /predict", "code": "http_error"}
                extra = [(b"allow", b"POST")]
                await send_response(send, 405, orjson.dumps(error), JSON, extra)
                return
            content_type = declared = timeout = authorization = None
            for name, value in scope["headers"]:
                if name == b"content-type":
                    content_type = value
                elif name == b"content-length":
                    declared = value
                elif name == TIMEOUT_HEADER:
                    timeout = value
                elif name == b"authorization":
                    authorization = value
            if self._keys and not token_matches(authorization, self._keys):
                status = 401
                await send_unauthorized(
                    send, "a valid API key is required: Authorization: Bearer KEY"
                )
                return
            try:
                fmt = body_format(content_type)
                timeout_s = timeout_header(timeout)
                body = await read_body(receive, declared, self._limit)
                dispatcher = self._runtime_of().dispatcher
                pending = dispatcher.enqueue(fmt, body, timeout_s)
                if dispatcher.is_queued(pending):
                    reply = await unless_client_leaves(receive, dispatcher.result(pending))
                else:
                    reply = await dispatcher.result(pending)
            except TorchpoolError as exc:
                status = exc.status
                await send_error(send, exc)
                return
            await send_response(send, 200, reply.body, _MEDIA_TYPES.get(reply.fmt, JSON), [])
        except Exception:
            status = 500  # a torchpool bug: uvicorn answers 500 and logs the traceback
            raise
        finally:
            self._observe(PREDICT_PATH, status, time.perf_counter() - started)
