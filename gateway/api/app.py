"""The HTTP surface: the app, its probes, and JSON errors everywhere.

The gateway does not look inside tensors: it checks the content type and the
size of a body and passes the bytes to a worker, which parses, validates, runs
and encodes. ``/predict`` itself is answered by :mod:`gateway.api.predict` ahead
of FastAPI; the other routes are FastAPI's. Errors from any layer are
TorchpoolErrors, whose status and JSON body come from :mod:`shared.errors`
and whose answers are made in :mod:`gateway.api.http`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api import admin, openai, triton, v2
from gateway.api.auth import ApiKeyMiddleware, parse_tokens
from gateway.api.health import health_json
from gateway.api.http import (
    JSON,
    error_response,
    errors_openapi,
    json_response,
    request_headers,
    runtime_of,
    server_not_ready_reason,
)
from gateway.api.metrics import Metrics
from gateway.api.metrics import install as install_metrics
from gateway.api.predict import PREDICT_PATH, PREDICT_PREFIX, PredictHandler
from gateway.api.sse import StreamPredictHandler
from gateway.api.status import install as install_status_page
from gateway.pool.runtime import Runtime
from shared import modelconfig
from shared.config import ServeSettings
from shared.errors import TorchpoolError

MSGPACK = "application/msgpack"

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
                        # No type: any JSON value is taken (a handler may read a
                        # string or an object); the worker says what it refuses.
                        "input_tensor": {
                            "description": "The model's input: for a tensor model a nested "
                            "list of numbers whose dimension 0 is the batch; for a handler, "
                            "any JSON value its preprocess takes.",
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
        **errors_openapi(400, 413, 415, 422, 500, 503, 504),
    },
}


class TorchpoolApp(FastAPI):
    """FastAPI for every route but the hot one: ``/predict`` goes straight to
    :class:`gateway.api.predict.PredictHandler`, past routing and middleware."""

    predict: PredictHandler | None = None
    # /predict asking for Server-Sent Events from a streaming model (gateway.api.sse).
    stream_predict: StreamPredictHandler | None = None
    # Everything under /v1/: the OpenAI API (gateway.api.openai), also past FastAPI.
    openai: openai.OpenAIHandler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.openai and scope["path"].startswith(openai.PREFIX):
            await self.openai(scope, receive, send)
            return
        if scope["type"] == "http" and self.predict:
            path: str = scope["path"]
            name: str | None = None
            if path.startswith(PREDICT_PREFIX) and "/" not in path[len(PREDICT_PREFIX) :]:
                name = path[len(PREDICT_PREFIX) :]
            if path == PREDICT_PATH or name is not None:
                headers = request_headers(scope)
                streamed = self.stream_predict
                if streamed is not None and streamed.wants(scope, headers, name):
                    await streamed(scope, receive, send, name, headers)
                    return
                await self.predict(scope, receive, send, name, headers)
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
                    "model's handler as it is (415 when it takes no raw input). With several "
                    "models, this is the default model (404 when there is none).",
                    "operationId": "predict",
                    **PREDICT_OPENAPI,
                }
            }
            schema["paths"][PREDICT_PREFIX + "{name}"] = {
                "post": {
                    "summary": "Predict with a named model",
                    "description": "As POST /predict, on the model served as ``name`` "
                    "(404 listing the served names when there is none).",
                    "operationId": "predict_named",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    **PREDICT_OPENAPI,
                    "responses": {
                        **PREDICT_OPENAPI["responses"],
                        **errors_openapi(404),
                    },
                }
            }
            schema["paths"].update(openai.paths())
            self.openapi_schema = schema
        return self.openapi_schema


# Builds the app's Runtime: the real one, or one over fakes for the fast tests.
RuntimeFactory = Callable[[modelconfig.Config, Callable[[str], None]], Runtime]


def create_app(
    settings: ServeSettings | modelconfig.Config,
    on_fatal: Callable[[str], None] | None = None,
    make_runtime: RuntimeFactory = Runtime,
) -> TorchpoolApp:
    """The app; its lifespan starts the models' worker pools and stops them on shutdown."""
    config = settings if isinstance(settings, modelconfig.Config) else None
    config = config or modelconfig.from_flags(cast(ServeSettings, settings))
    metrics = Metrics()  # this app's own registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = make_runtime(config, on_fatal or (lambda reason: None))
        app.state.runtime = runtime
        metrics.attach(runtime)
        grpc_server = None
        try:
            # Inside the try: a start that fails half-way still stops what it
            # started (and removes the runtime folder and the shared weights).
            await runtime.start()
            if config.server.grpc_port is not None:
                from gateway.api.grpc.server import GrpcServer  # grpcio only when asked for

                grpc_server = GrpcServer(runtime, metrics, app.version)
                await grpc_server.start()
            yield
        finally:
            try:
                if grpc_server is not None:
                    await grpc_server.stop()
            finally:
                await runtime.stop()

    app = TorchpoolApp(
        title="torchpool",
        description="A PyTorch model served from a pool of pinned worker processes.",
        version="0.1.0",
        lifespan=lifespan,
    )
    keys = parse_tokens(config.server.api_key)
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    admin.install(app, config.server.admin_token)
    app.add_exception_handler(TorchpoolError, _torchpool_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    app.predict = PredictHandler(lambda: app.state.runtime, keys, metrics.observe_request)
    app.stream_predict = StreamPredictHandler(
        lambda: app.state.runtime, keys, metrics.observe_request
    )
    app.openai = openai.OpenAIHandler(lambda: app.state.runtime, keys, metrics.observe_request)

    @app.get("/health", responses={503: {"description": "No worker is ready", **_ANY_JSON}})
    async def health(request: Request) -> Response:
        """Per-model and per-worker status; 200 when at least one worker is ready, else 503."""
        document = health_json(runtime_of(request))
        return json_response(document, 200 if document["ready_workers"] > 0 else 503)

    @app.get("/health/live")
    async def live() -> Response:
        """200 while the gateway process runs."""
        return json_response({"status": "alive"})

    @app.get(
        "/health/ready", responses={503: {"description": "Not ready, or draining", **_ANY_JSON}}
    )
    async def ready(request: Request) -> Response:
        """200 when every model has its min_ready workers ready and the server is not draining."""
        runtime = runtime_of(request)
        reason = server_not_ready_reason(runtime)
        models = list(runtime.models.values())
        document: dict[str, Any] = {
            "ready": reason is None,
            "ready_workers": sum(len(m.pool.ready_workers()) for m in models),
            "min_ready": sum(m.settings.min_ready for m in models),
        }
        if reason is not None:
            document["reason"] = reason
        return json_response(document, 200 if reason is None else 503)

    app.state.metrics = metrics
    app.state.extensions = triton.extensions(config.server.admin_token)
    install_metrics(app, metrics)
    install_status_page(app, metrics)
    triton.install(app, config.server.admin_token)  # before v2: /v2/models/stats is no model
    v2.install(app)
    from gateway.api import generate

    generate.install(app)
    return app


async def _torchpool_error(request: Request, exc: TorchpoolError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return json_response({"error": str(exc.detail), "code": "http_error"}, exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return json_response({"error": str(exc.errors()), "code": "bad_request"}, 422)
