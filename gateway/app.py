"""The HTTP surface: /predict and the health probes, with JSON errors everywhere.

The gateway does not look inside tensors: it checks the content type and the
size of a body and passes the bytes to a worker, which parses, validates, runs
and encodes. Errors from any layer are TorchpoolErrors, turned into responses
in exactly one place (``_torchpool_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from gateway import admin
from gateway.auth import ApiKeyMiddleware, parse_tokens
from gateway.dispatch import Reply
from gateway.health import health_json
from gateway.metrics import Metrics
from gateway.metrics import install as install_metrics
from gateway.runtime import Runtime
from gateway.status import install as install_status_page
from shared import protocol
from shared.config import ServeSettings
from shared.errors import (
    ClientClosed,
    PayloadTooLarge,
    RequestError,
    TorchpoolError,
    Unavailable,
    UnsupportedMediaType,
)

JSON = "application/json"
# Shortens this request's deadline below --timeout-s, in seconds.
TIMEOUT_HEADER = "x-request-timeout"
MSGPACK = "application/msgpack"
_BODY_FORMATS = {
    JSON: protocol.FMT_JSON,
    MSGPACK: protocol.FMT_MSGPACK,
    "application/x-msgpack": protocol.FMT_MSGPACK,
    "application/vnd.msgpack": protocol.FMT_MSGPACK,
}
_MEDIA_TYPES = {protocol.FMT_JSON: JSON, protocol.FMT_MSGPACK: MSGPACK}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}


def _error_responses(*statuses: int) -> dict[str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route answers, so clients know them."""
    return {
        str(status): {
            "description": HTTPStatus(status).phrase,
            "content": {JSON: {"schema": _ERROR_SCHEMA}},
        }
        for status in statuses
    }


_ANY_JSON: dict[str, Any] = {"content": {JSON: {"schema": {}}}}

PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["input_tensor"],
                    "properties": {
                        "input_tensor": {
                            "description": "Nested list of numbers; dimension 0 is the batch.",
                            "type": "array",
                        }
                    },
                }
            },
            MSGPACK: {
                "schema": {
                    "description": 'msgpack map {"input_tensor": {"dtype", "shape", "data"}}',
                    "type": "string",
                    "format": "binary",
                }
            },
        },
    },
    "responses": {
        "200": {
            "description": '{"prediction": ...} in the format of the request',
            "content": {JSON: {"schema": {}}, MSGPACK: {"schema": {}}},
        },
        **_error_responses(400, 413, 415, 422, 500, 503, 504),
    },
}


def json_response(
    document: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type=JSON, headers=headers)


def create_app(settings: ServeSettings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app; its lifespan starts the worker pool and stops it on shutdown."""
    metrics = Metrics()  # this app's own registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, on_fatal or (lambda reason: None))
        app.state.runtime = runtime
        metrics.attach(runtime)
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="torchpool",
        description="A PyTorch model served from a pool of pinned worker processes.",
        version="0.1.0",
        lifespan=lifespan,
    )
    if keys := parse_tokens(settings.api_key):
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    admin.install(app, settings.admin_token)
    app.add_exception_handler(TorchpoolError, _torchpool_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    max_body = settings.max_body_bytes

    def runtime_of(request: Request) -> Runtime:
        runtime: Runtime = request.app.state.runtime
        return runtime

    @app.post("/predict", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request) -> Response:
        """Run the model on ``{"input_tensor": [...]}``; answers ``{"prediction": ...}``."""
        fmt = _body_format(request.headers.get("content-type"))
        timeout_s = _timeout_header(request.headers.get(TIMEOUT_HEADER))
        body = await _read_body(request, max_body)
        dispatcher = runtime_of(request).dispatcher
        pending = dispatcher.enqueue(fmt, body, timeout_s)
        if dispatcher.is_queued(pending):
            reply = await _unless_client_leaves(request, dispatcher.result(pending))
        else:
            reply = await dispatcher.result(pending)
        return Response(reply.body, media_type=_MEDIA_TYPES.get(reply.fmt, JSON))

    @app.get("/health", responses={503: {"description": "No worker is ready", **_ANY_JSON}})
    async def health(request: Request) -> Response:
        """Per-worker status; 200 when at least one worker is ready, else 503."""
        document = health_json(runtime_of(request).pool)
        return json_response(document, 200 if document["ready_workers"] > 0 else 503)

    @app.get("/health/live")
    async def live() -> Response:
        """200 while the gateway process runs."""
        return json_response({"status": "alive"})

    @app.get(
        "/health/ready", responses={503: {"description": "Not ready, or draining", **_ANY_JSON}}
    )
    async def ready(request: Request) -> Response:
        """200 when at least --min-ready workers are ready and the server is not draining."""
        pool = runtime_of(request).pool
        count = len(pool.ready_workers())
        is_ready = count >= settings.min_ready and not pool.draining
        return json_response(
            {"ready": is_ready, "ready_workers": count, "min_ready": settings.min_ready},
            200 if is_ready else 503,
        )

    install_metrics(app, metrics)
    install_status_page(app, metrics)
    from gateway import v2  # imported here: it builds on this module's helpers

    v2.install(app)
    return app


def _body_format(content_type: str | None) -> str:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    fmt = _BODY_FORMATS.get(media)
    if fmt is None and media.endswith("+json"):
        fmt = protocol.FMT_JSON
    if fmt is None:
        shown = media or "none"
        raise UnsupportedMediaType(
            f"content type {shown!r} is not supported; send application/json "
            f"(or application/msgpack)"
        )
    return fmt


def _timeout_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise RequestError(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {value!r}")
    return seconds


async def _unless_client_leaves(request: Request, waiting: Awaitable[Reply]) -> Reply:
    """Wait for a queued request's reply, dropping it if the client disconnects first."""
    result = asyncio.ensure_future(waiting)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        result.cancel()  # Dispatcher.result drops the request from the queue
        raise ClientClosed("the client closed the connection before the answer")
    return result.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it (413) as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise RequestError('empty body; send {"input_tensor": [[...], ...]}')
    return b"".join(chunks)


async def _torchpool_error(request: Request, exc: TorchpoolError) -> Response:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Unavailable) else None
    return json_response(exc.to_json(), exc.status, headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return json_response({"error": str(exc.detail), "code": "http_error"}, exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return json_response({"error": str(exc.errors()), "code": "bad_request"}, 422)
