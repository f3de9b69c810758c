"""``POST /predict`` as plain ASGI: the request path that carries the load.

Every /predict request would otherwise cross FastAPI's router, its middleware
stack and its per-request hooks before reaching a handler that only forwards
bytes. Profiles under load showed that frame work costing more gateway CPU
than the forward pass of a small model, so /predict is answered here, before
FastAPI, by a handler that reads the headers once, reads the body, hands it
to the dispatcher and writes the reply. The behaviour is the README's
contract, the same as every other route's: JSON errors with their status from
:mod:`shared.errors`, API keys, metrics, deadlines.

The gateway never parses a body. JSON and msgpack go to the worker as
``json``/``msgpack``; any other content type (an image, audio, text, a
multipart upload) goes as ``raw`` with its Content-Type, and the worker
decides what the model can take (415 from the worker when it takes no raw
input).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from starlette.types import Receive, Scope, Send

from gateway.api.auth import require_api_key
from gateway.api.http import (
    RequestHeaders,
    read_body,
    request_headers,
    run_request,
    send_error,
    send_response,
    timeout_header,
)
from shared import protocol
from shared.errors import TorchpoolError
from shared.media import OCTET_STREAM, media_type

if TYPE_CHECKING:
    from gateway.pool.model import ModelRuntime
    from gateway.pool.runtime import Runtime

PREDICT_PATH = "/predict"
PREDICT_PREFIX = "/predict/"  # + a model's name
PREDICT_NAMED = "/predict/{name}"  # its route, as metrics label it

JSON = b"application/json"
MSGPACK = b"application/msgpack"
_BODY_FORMATS = {
    "application/json": protocol.FMT_JSON,
    "application/msgpack": protocol.FMT_MSGPACK,
    "application/x-msgpack": protocol.FMT_MSGPACK,
    "application/vnd.msgpack": protocol.FMT_MSGPACK,
}
_MEDIA_TYPES = {protocol.FMT_JSON: JSON, protocol.FMT_MSGPACK: MSGPACK}
_EMPTY = 'empty body; send {"input_tensor": [[...], ...]}'

# (route, status, seconds, model: the served model it was for, or "") -> None
Observer = Callable[[str, int, float, str], None]
# A request as the dispatcher takes it: (fmt, body, timeout_s, REQUEST header fields).
Prepared = tuple[str, bytes, float | None, protocol.RequestExtras | None]


def body_format(content_type: bytes | None) -> tuple[str, protocol.RequestExtras | None]:
    """The wire format for a request's content type, and the REQUEST fields it adds.

    JSON (``application/json``, ``*+json``) and msgpack are tensor bodies; anything
    else, or no content type at all, is ``raw`` and carries its full Content-Type.
    """
    media = media_type(content_type)
    fmt = _BODY_FORMATS.get(media)
    if fmt is None and media.endswith("+json"):
        fmt = protocol.FMT_JSON
    if fmt is not None:
        return fmt, None
    # latin-1: HTTP header bytes as they came, whatever they hold.
    ctype = (content_type or b"").strip().decode("latin-1")
    return protocol.FMT_RAW, {"ctype": ctype or OCTET_STREAM}


class Exchange:
    """One request's outcome as metrics count it: its status and its model's name."""

    __slots__ = ("model", "status")

    def __init__(self) -> None:
        self.status = 200
        self.model = ""  # the served model it was for, once the request found it


class PredictRoute(abc.ABC):
    """What both ``/predict`` handlers share: the API key, the model, the body, the
    errors and the metrics. A subclass writes the answer (:meth:`answer`)."""

    def __init__(
        self,
        runtime_of: Callable[[], Runtime],
        api_keys: list[bytes],
        observe: Observer,
    ) -> None:
        self._runtime_of = runtime_of
        self._keys = api_keys
        self._observe = observe

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        model_name: str | None = None,
        headers: RequestHeaders | None = None,
    ) -> None:
        """``model_name``: the model of ``/predict/{name}``; None for ``/predict``.
        ``headers``: the scope's, when the caller has parsed them already."""
        started = time.perf_counter()
        exchange = Exchange()
        try:
            if headers is None:
                headers = request_headers(scope)
            await self.answer(exchange, scope, headers, receive, send, model_name)
        except TorchpoolError as exc:
            # A client that left (ClientClosed) gets its 499 too: the server drops it,
            # and the exchange ends as every other does.
            exchange.status = exc.status
            await send_error(send, exc)
        except Exception:
            exchange.status = 500  # a torchpool bug: uvicorn answers 500 and logs the traceback
            raise
        finally:
            route = PREDICT_PATH if model_name is None else PREDICT_NAMED
            self._observe(route, exchange.status, time.perf_counter() - started, exchange.model)

    @abc.abstractmethod
    async def answer(
        self,
        exchange: Exchange,
        scope: Scope,
        headers: RequestHeaders,
        receive: Receive,
        send: Send,
        model_name: str | None,
    ) -> None:
        """Write the whole answer and set ``exchange.status``; raise a TorchpoolError
        for an error answered before anything was sent."""

    async def prepare(
        self,
        exchange: Exchange,
        headers: RequestHeaders,
        receive: Receive,
        model_name: str | None,
    ) -> tuple[ModelRuntime, Prepared]:
        """Check the API key, find the model, read the body: the request, ready to run."""
        if self._keys:
            require_api_key(headers.authorization, self._keys)
        model = self._runtime_of().model(model_name)
        exchange.model = model.name
        fmt, fields = body_format(headers.content_type)
        timeout_s = timeout_header(headers.timeout)
        limit = model.settings.max_body_bytes
        body = await read_body(receive, headers.content_length, limit, _EMPTY)
        return model, (fmt, body, timeout_s, fields)


class PredictHandler(PredictRoute):
    """Answers one ``POST /predict``; the app calls it before FastAPI sees the request."""

    async def answer(
        self,
        exchange: Exchange,
        scope: Scope,
        headers: RequestHeaders,
        receive: Receive,
        send: Send,
        model_name: str | None,
    ) -> None:
        if scope["method"] != "POST":
            exchange.status = 405
            error = {"error": f"use POST for {scope['path']}", "code": "http_error"}
            await send_response(send, 405, orjson.dumps(error), JSON, [(b"allow", b"POST")])
            return
        model, (fmt, body, timeout_s, fields) = await self.prepare(
            exchange, headers, receive, model_name
        )
        reply = await run_request(receive, model.dispatcher, fmt, body, timeout_s, fields)
        await send_response(send, 200, reply.body, _MEDIA_TYPES.get(reply.fmt, JSON))
