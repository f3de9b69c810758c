"""The Open Inference Protocol's generate extension, as Triton defines it.

    POST /v2/models/{name}[/versions/{v}]/generate          one JSON answer
    POST /v2/models/{name}[/versions/{v}]/generate_stream   Server-Sent Events

The body is JSON whatever its Content-Type says (as Triton takes it):
``{"<input name>": value, "parameters": {...}}``; the model has
one input, so one input is named (``text_input`` by Triton's convention).
Every answer, or every event of a stream, is
``{"model_name", "model_version", "<output name>": value}``: a handler's
``postprocess`` that returns a dict names the outputs; a string is
``text_output``, anything else ``output__0``. ``generate`` answers once with
every output: strings joined (the whole generated text), other values in a list.

Only a model whose handler streams (``predict_stream``) serves these routes;
another answers 400 pointing at ``/infer``. Errors are ``{"error": ...}`` with
the /v2 statuses, in a stream ``event: error`` as on ``/predict``. No 415:
the Content-Type is not read, and a body that is not a generate request's
JSON is bad input, 400, as Triton answers every invalid argument.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api import http, sse, v2
from gateway.api.http import v2_error_response
from gateway.api.predict import Prepared
from gateway.pool.model import ModelRuntime
from shared import protocol
from shared.errors import RequestError, TorchpoolError

# The routes' last steps, after /models/{name}[/versions/{v}].
GENERATE: Final = "/generate"
GENERATE_STREAM: Final = "/generate_stream"

GENERATE_FRAMING: Final = sse.Framing(
    end=b"",  # Triton's stream just ends
    error_json=lambda error: orjson.dumps(error.to_v2_json()),
    send_error=lambda send, error: v2_error_response(error)({"type": "http"}, _no_receive, send),
)


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])


class EventStream(Response):
    """A response that runs a stream and writes its events (:func:`sse.write_stream`)."""

    def __init__(self, model: ModelRuntime, request: Prepared) -> None:
        super().__init__(media_type=sse.EVENT_STREAM.decode())
        self._model = model
        self._request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await sse.write_stream(self._model, receive, send, self._request, GENERATE_FRAMING)
        except TorchpoolError as error:
            await GENERATE_FRAMING.send_error(send, error)


async def _prepare(
    request: Request, name: str, version: str | None
) -> tuple[ModelRuntime, Prepared]:
    model = v2.check_model(http.runtime_of(request), name, version)
    if model.pool.ready_workers() and not sse.model_streams(model.pool):
        raise RequestError(
            f"model {name!r} does not stream (its handler has no predict_stream): use /infer"
        )
    timeout_s = http.timeout_header(request.headers.get(http.TIMEOUT_HEADER))
    body = await http.read_body(
        request.receive,
        request.headers.get("content-length"),
        model.settings.max_body_bytes,
        'empty body; send a generate request {"text_input": ...}',
    )
    fields: protocol.RequestExtras = {"model": name, "version": v2.VERSION}
    return model, (protocol.FMT_GENERATE, body, timeout_s, fields)


async def generate(request: Request, name: str, version: str | None = None) -> Response:
    """Run the model to the end of its outputs; one JSON answer."""
    try:
        model, (fmt, body, timeout_s, fields) = await _prepare(request, name, version)
        reply = await http.run_request(
            request.receive, model.dispatcher, fmt, body, timeout_s, fields
        )
    except TorchpoolError as error:
        return v2_error_response(error)
    return Response(reply.body, media_type="application/json")


async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
    """Run the model and send each output as a Server-Sent Event as soon as it is made."""
    try:
        model, prepared = await _prepare(request, name, version)
    except TorchpoolError as error:
        return v2_error_response(error)
    return EventStream(model, prepared)


_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": 'One input by name, e.g. {"text_input": "Hello"}, and '
                    "optional parameters",
                    "properties": {"parameters": {"type": "object"}},
                }
            }
        },
    }
}

for _base in ("/models/{name}", "/models/{name}/versions/{version}"):
    router.add_api_route(
        _base + GENERATE,
        generate,
        methods=["POST"],
        openapi_extra=_BODY,
        responses={
            200: {"content": {"application/json": {"schema": {}}}},
            **v2.errors_openapi(400, 404, 413, 500, 503, 504),
        },
    )
    router.add_api_route(
        _base + GENERATE_STREAM,
        generate_stream,
        methods=["POST"],
        openapi_extra=_BODY,
        responses={
            200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **v2.errors_openapi(400, 404, 413, 500, 503, 504),
        },
    )


def install(app: FastAPI) -> None:
    """Serve the generate routes on ``app``."""
    app.include_router(router)
