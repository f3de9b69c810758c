"""Errors as the OpenAI API answers them, so its clients raise their own exception types.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found"}}

The status is torchpool's (:mod:`shared.errors`), except that every bad request
is a 400 as OpenAI's are (422 and 415 included): the ``openai`` client raises
``BadRequestError`` for 400, ``AuthenticationError`` for 401, ``NotFoundError``
for 404, and an ``APIStatusError`` subclass for the others (413, 503 with
Retry-After when no worker is ready or the queue is full, 504, 500). ``code``
is torchpool's stable error code; ``param`` the request field at fault, when
one is.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Send

from gateway.api.http import JSON, error_headers, send_response
from shared.errors import ModelNotFound, PayloadTooLarge, RequestError, TorchpoolError, Unauthorized

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"


def status_of(error: TorchpoolError) -> int:
    """The HTTP status of ``error`` on the /v1 routes."""
    if isinstance(error, RequestError) and not isinstance(error, PayloadTooLarge | ModelNotFound):
        return 400
    return error.status


def document(error: TorchpoolError) -> dict[str, Any]:
    """``error`` as OpenAI's error object."""
    if isinstance(error, Unauthorized):
        kind = AUTHENTICATION
    elif isinstance(error, RequestError):
        kind = INVALID_REQUEST
    else:
        kind = SERVER_ERROR
    param = error.details.get("param")
    body: dict[str, Any] = {
        "message": error.message,
        "type": kind,
        "param": param if isinstance(param, str) else None,
        "code": error.code,
    }
    models = error.details.get("models")
    if isinstance(models, list):
        body["models"] = models  # the served names, beside an unknown model's 404
    return {"error": body}


def error_json(error: TorchpoolError) -> bytes:
    return orjson.dumps(document(error))


async def send_error(send: Send, error: TorchpoolError) -> None:
    """A whole error answer on a plain ASGI ``send``."""
    extra = [(k.lower().encode(), v.encode()) for k, v in error_headers(error).items()]
    await send_response(send, status_of(error), error_json(error), JSON.encode(), extra)
