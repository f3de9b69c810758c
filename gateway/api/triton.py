"""Triton's model repository and statistics extensions, over REST (gRPC shares the rules).

    POST /v2/repository/models/{name}/load     load, or reload what is served (admin token)
    POST /v2/repository/models/{name}/unload   unload (admin token)
    GET  /v2/models/stats                      statistics of every model
    GET  /v2/models/{name}[/versions/{v}]/stats  one model's

The repository routes exist only with --admin-token, and need
``Authorization: Bearer <admin token>`` as /admin does; they map onto its rules:

- load of a served model: the rolling reload of ``POST /admin/models/{name}/reload``
  (new workers ready before the old ones drain; if they fail, the old serve on);
- load of a model not served: ``PUT /admin/models/{name}`` with the settings in
  the body's ``parameters.config`` (a ``[models.NAME]`` table as a JSON string,
  where Triton takes a model configuration), or without one, the settings the
  server started it with (after an unload);
- unload: ``DELETE /admin/models/{name}`` (in-flight requests finish, then its
  workers stop).

Statistics come from :mod:`gateway.api.stats`. Errors are ``{"error": ...}``
with the /v2 statuses, as on every /v2 route.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from gateway.api import admin, v2
from gateway.api.http import json_response, runtime_of
from gateway.api.stats import model_statistics
from gateway.pool.runtime import Runtime
from shared.errors import ModelNotFound, RequestError

REPOSITORY: Final = "model_repository"
STATISTICS: Final = "statistics"
NO_FILES: Final = "file parameters are not supported: the model loads from its path"


def extensions(admin_token: str | None) -> list[str]:
    """The protocol extensions this server serves (GET /v2, gRPC ServerMetadata)."""
    served = [*v2.EXTENSIONS, "model_configuration", STATISTICS]
    if admin_token:
        served.append(REPOSITORY)
    return served


async def load(runtime: Runtime, name: str, config: str | None) -> None:
    """Triton's load: reload a served model, or load one from ``config`` or its start settings."""
    if name in runtime.models:
        if config is not None:
            raise RequestError(
                f"model {name!r} is served: unload it before loading it with a new config"
            )
        await runtime.model(name).reload()
        return
    if config is not None:
        try:
            table = orjson.loads(config)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"parameters.config is not valid JSON: {exc}") from exc
        if not isinstance(table, dict):
            raise RequestError("parameters.config must be a JSON object of model settings")
        settings = admin.model_settings(name, table, "parameters.config")
    elif name in runtime.config.models:
        settings = runtime.config.models[name]
    else:
        raise ModelNotFound(
            f"unknown model {name!r}: send its settings as parameters.config to load it "
            f"(served: {runtime.served_names()})"
        )
    await runtime.load(name, settings)


async def unload(runtime: Runtime, name: str) -> None:
    await runtime.unload(name)


async def _load_parameters(request: Request) -> str | None:
    """The ``config`` parameter of a load request's body, if any (the body is optional)."""
    raw = await request.body()
    if not raw:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from exc
    parameters = body.get("parameters", {}) if isinstance(body, dict) else None
    if not isinstance(parameters, dict):
        raise RequestError('send {"parameters": {"config": "<JSON model settings>"}}')
    if any(key.startswith("file:") for key in parameters):
        raise RequestError(NO_FILES)
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        config = orjson.dumps(config).decode()
    return config


def statistics_document(request: Request, name: str | None, version: str | None) -> Any:
    runtime = runtime_of(request)
    models = [v2.check_model(runtime, name, version)] if name else runtime.models.values()
    metrics = request.app.state.metrics
    return {"model_stats": [model_statistics(metrics, m, v2.VERSION) for m in models]}


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], route_class=v2.V2Route)


@router.get("/models/stats", responses=v2.errors_openapi(404))
async def all_statistics(request: Request) -> Response:
    """Triton's statistics of every served model."""
    return json_response(statistics_document(request, None, None))


async def statistics(request: Request, name: str, version: str | None = None) -> Response:
    """Triton's statistics of one model: requests, failures, queue time, batches."""
    return json_response(statistics_document(request, name, version))


for _base in ("/models/{name}", "/models/{name}/versions/{version}"):
    router.add_api_route(
        _base + "/stats", statistics, methods=["GET"], responses=v2.errors_openapi(404)
    )


def install(app: FastAPI, admin_token: str | None) -> None:
    """Serve the statistics routes, and with ``admin_token`` the repository's, on ``app``."""
    app.include_router(router)
    if not admin_token:
        return
    repository = APIRouter(
        prefix="/v2/repository", route_class=v2.V2Route, tags=["Open Inference Protocol"]
    )

    def check(request: Request) -> Runtime:
        header = request.headers.get("authorization")
        admin.admin_check(admin_token, header.encode() if header else None)
        return runtime_of(request)

    @repository.post("/models/{name}/load", responses=v2.errors_openapi(400, 401, 404, 500))
    async def load_model(request: Request, name: str) -> Response:
        """Load a model, or reload a served one (rolling); 200 once it is ready."""
        runtime = check(request)
        await load(runtime, name, await _load_parameters(request))
        return json_response({})

    @repository.post("/models/{name}/unload", responses=v2.errors_openapi(401, 404))
    async def unload_model(request: Request, name: str) -> Response:
        """Stop routing to the model; in-flight requests finish, then its workers stop."""
        runtime = check(request)
        await unload(runtime, name)
        return json_response({})

    app.include_router(repository)
