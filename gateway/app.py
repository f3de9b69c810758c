"""The HTTP surface: the app, its probes, and JSON errors everywhere.

The gateway does not look inside tensors: it checks the content type and the
size of a body and passes the bytes to a worker, which parses, validates, runs
and encodes. ``/predict`` itself is answered by :mod:`gateway.predict` ahead
of FastAPI; the other routes are FastAPI's. Errors from any layer are
TorchpoolErrors, whose status and JSON body come from :mod:`shared.errors`
and whose answers are made in :mod:`gateway.http`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import admin, v2
from gateway.auth import ApiKeyMiddleware, parse_tokens
from gateway.health import health_json
from gateway.http import JSON, error_response, json_response, not_ready_reason, runtime_of
from gateway.metrics import Metrics
from gateway.metrics import install as install_metrics
from gateway.predict import PREDICT_PATH, PredictHandler
from gateway.runtime import Runtime
from gateway.sse import StreamPredictHandler
from gateway.status import install as install_status_page
from shared.config import ServeSettings
from shared.errors import TorchpoolError

MSGPACK = "application/msgpack"

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


class TorchpoolApp(FastAPI):
    """FastAPI for every route but the hot one: ``/predict`` goes straight to
    :class:`gateway.predict.PredictHandler`, past routing and middleware."""

    predict: PredictHandler | None = None
    # /predict asking for Server-Sent Events from a streaming model (gateway.sse).
    stream_predict: StreamPredictHandler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PREDICT_PATH and self.predict:
            if self.stream_predict is not None and self.stream_predict.wants(scope):
                await self.stream_predict(scope, receive, send)
                return
            await self.predict(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, plus /predict, which no FastAPI route serves."""
        if self.openapi_schema is None:
            schema = super().openapi()
            schema["paths"][PREDICT_PATH] = {
                "post": {
                    "summary": "Predict",
                    "description": 'Run the model on ``{"input_tensor": [...]}``; answers '
                    '``{"prediction": ...}``. A body of any other content type goes to the '
                    "model's handler as it is (415 when it takes no raw input).",
                    "operationId": "predict",
                    **PREDICT_OPENAPI,
                }
            }
            self.openapi_schema = schema
        return self.openapi_schema


def create_app(
    settings: ServeSettings, on_fatal: Callable[[str], None] | None = None
) -> TorchpoolApp:
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

    app = TorchpoolApp(
        title="torchpool",
        description="A PyTorch model served from a pool of pinned worker processes.",
        version="0.1.0",
        lifespan=lifespan,
    )
    keys = parse_tokens(settings.api_key)
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    admin.install(app, settings.admin_token)
    app.add_exception_handler(TorchpoolError, _torchpool_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    app.predict = PredictHandler(
        lambda: app.state.runtime, settings.max_body_bytes, keys, metrics.observe_request
    )
    app.stream_predict = StreamPredictHandler(
        lambda: app.state.runtime, settings.max_body_bytes, keys, metrics.observe_request
    )

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
        is_ready = not_ready_reason(pool, settings.min_ready) is None
        return json_response(
            {
                "ready": is_ready,
                "ready_workers": len(pool.ready_workers()),
                "min_ready": settings.min_ready,
            },
            200 if is_ready else 503,
        )

    install_metrics(app, metrics)
    install_status_page(app, metrics)
    v2.install(app)
    from gateway import generate

    generate.install(app)
    return app


async def _torchpool_error(request: Request, exc: TorchpoolError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return json_response({"error": str(exc.detail), "code": "http_error"}, exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return json_response({"error": str(exc.errors()), "code": "bad_request"}, 422)
