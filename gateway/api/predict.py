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

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from starlette.types import Receive, Scope, Send

from gateway.api import http
from gateway.api.auth import token_matches
from gateway.api.http import read_body, run_request, send_error, send_response, timeout_header
from shared import protocol
from shared.errors import TorchpoolError, Unauthorized

if TYPE_CHECKING:
    from gateway.pool.runtime import Runtime

PREDICT_PATH = "/predict"
PREDICT_PREFIX = "/predict/"  # + a model's name
PREDICT_NAMED = "/predict/{name}"  # its route, as metrics label it
TIMEOUT_HEADER = http.TIMEOUT_HEADER.encode()

JSON = b"application/json"
MSGPACK = b"application/msgpack"
# Taken for a body that names no content type: bytes the worker's handler reads.
OCTET_STREAM = b"application/octet-stream"
_BODY_FORMATS = {
    JSON: protocol.FMT_JSON,
    MSGPACK: protocol.FMT_MSGPACK,
    b"application/x-msgpack": protocol.FMT_MSGPACK,
    b"application/vnd.msgpack": protocol.FMT_MSGPACK,
}
_MEDIA_TYPES = {protocol.FMT_JSON: JSON, protocol.FMT_MSGPACK: MSGPACK}
_EMPTY = 'empty body; send {"input_tensor": [[...], ...]}'

# (route, status, seconds, model: the served model it was for, or "") -> None
Observer = Callable[[str, int, float, str], None]


def body_format(content_type: bytes | None) -> tuple[str, protocol.RequestExtras | None]:
    """The wire format for a request's content type, and the REQUEST fields it adds.

    JSON (``application/json``, ``*+json``) and msgpack are tensor bodies; anything
    else, or no content type at all, is ``raw`` and carries its full Content-Type.
    """
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    fmt = _BODY_FORMATS.get(media)
    if fmt is None and media.endswith(b"+json"):
        fmt = protocol.FMT_JSON
    if fmt is not None:
        return fmt, None
    ctype = (content_type or b"").strip() or OCTET_STREAM
    # latin-1: HTTP header bytes as they came, whatever they hold.
    return protocol.FMT_RAW, {"ctype": ctype.decode("latin-1")}


class PredictHandler:
    """Answers one ``POST /predict``; the app calls it before FastAPI sees the request."""

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
        self, scope: Scope, receive: Receive, send: Send, model_name: str | None = None
    ) -> None:
        """``model_name``: the model of ``/predict/{name}``; None for ``/predict``."""
        started = time.perf_counter()
        status = 200
        served = ""  # the model's name for metrics, once the request found it
        try:
            if scope["method"] != "POST":
                status = 405
                error = {"error": f"use POST for {scope['path']}", "code": "http_error"}
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
            try:
                if self._keys and not token_matches(authorization, self._keys):
                    raise Unauthorized("a valid API key is required: Authorization: Bearer KEY")
                model = self._runtime_of().model(model_name)
                served = model.name
                fmt, extra_fields = body_format(content_type)
                timeout_s = timeout_header(timeout)
                limit = model.settings.max_body_bytes
                body = await read_body(receive, declared, limit, _EMPTY)
                dispatcher = model.dispatcher
                reply = await run_request(receive, dispatcher, fmt, body, timeout_s, extra_fields)
            except TorchpoolError as exc:
                status = exc.status
                await send_error(send, exc)
                return
            await send_response(send, 200, reply.body, _MEDIA_TYPES.get(reply.fmt, JSON))
        except Exception:
            status = 500  # a torchpool bug: uvicorn answers 500 and logs the traceback
            raise
        finally:
            route = PREDICT_PATH if model_name is None else PREDICT_NAMED
            self._observe(route, status, time.perf_counter() - started, served)
