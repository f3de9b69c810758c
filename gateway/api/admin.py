"""Admin endpoints: resize a model's pool, load, unload and reload models while serving.

Off (404) unless --admin-token is set; then every call needs
``Authorization: Bearer <admin token>`` (401 with ``WWW-Authenticate`` without).

    GET/PUT  /admin/workers                    the one (or default) model's pool size
    GET/PUT  /admin/models/{name}/workers      one model's pool size: {"workers": N}
    PUT      /admin/models/{name}[?wait=false] load a model: body = its settings (as a
                                               [models.NAME] table, in JSON; a relative
                                               path is from the gateway's directory); 201 when
                                               ready, 202 at once with wait=false, 409
                                               if the name is taken
    DELETE   /admin/models/{name}              unload: 404 for new requests from now
                                               on, in-flight ones finish, workers stop
    POST     /admin/models/{name}/reload       rolling reload (the file again); 200 when
                                               done, 500 with the reason if the new
                                               workers failed (the old ones serve on)

Scaling down and unloading drain the removed workers (they finish what they
hold) before they stop; nothing is dropped.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from gateway.api.auth import token_matches
from gateway.api.health import health_json
from gateway.api.http import json_response, request_headers, runtime_of
from gateway.pool.model import ModelRuntime
from gateway.pool.runtime import Runtime
from shared import modelconfig, modelfile
from shared.config import ConfigError, PoolSettings
from shared.errors import ModelLoadError, RequestError, Unauthorized

MAX_WORKERS = 256


def model_settings(name: str, body: dict[str, Any], where: str) -> PoolSettings:
    """A model's settings sent to be loaded (a ``[models.NAME]`` table as a JSON object),
    checked as far as the gateway can without a worker; 400 with the reason if not."""
    try:
        settings = modelconfig.model_settings(name, body, where)
        if settings.model and not settings.handler:
            # What every worker would refuse, refused before one is spawned.
            modelfile.check(
                settings.model,
                model_class=bool(settings.model_class),
                trust_pickle=settings.trust_pickle,
            )
    except (ConfigError, ModelLoadError) as exc:
        raise RequestError(str(exc)) from exc
    return settings


def admin_check(admin_token: str, header: bytes | None) -> None:
    """401 unless ``header`` is ``Bearer <admin token>``."""
    if not token_matches(header, [admin_token.encode()]):
        raise Unauthorized("the admin token is required: Authorization: Bearer TOKEN")


def install(app: FastAPI, admin_token: str | None) -> None:
    """Add /admin routes to ``app`` when an admin token is configured."""
    if not admin_token:
        return
    router = APIRouter(prefix="/admin")

    def check(request: Request) -> Runtime:
        admin_check(admin_token, request_headers(request.scope).authorization)
        return runtime_of(request)

    def pool_document(runtime: Runtime, model: ModelRuntime) -> Response:
        document: dict[str, Any] = {
            "model": model.name,
            "target_workers": model.supervisor.target_workers,
            "health": health_json(runtime, [model]),
        }
        return json_response(document)

    async def json_body(request: Request) -> Any:
        try:
            return orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}") from exc

    async def resize(request: Request, name: str | None) -> Response:
        runtime = check(request)
        model = runtime.model(name)
        body = await json_body(request)
        count = body.get("workers") if isinstance(body, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_WORKERS:
            raise RequestError(f'send {{"workers": N}} with 0 <= N <= {MAX_WORKERS}')
        await model.supervisor.scale_to(count)
        return pool_document(runtime, model)

    @router.get("/workers")
    async def get_workers(request: Request) -> Response:
        """The one (or default) model's target pool size and its current health."""
        runtime = check(request)
        return pool_document(runtime, runtime.model())

    @router.put("/workers")
    async def put_workers(request: Request) -> Response:
        """Resize the one (or default) model's pool: body ``{"workers": N}``. New workers
        boot in the background; removed ones drain first. Answers with the pool as it is."""
        return await resize(request, None)

    @router.get("/models/{name}/workers")
    async def get_model_workers(request: Request, name: str) -> Response:
        """A model's target pool size and its current health."""
        runtime = check(request)
        return pool_document(runtime, runtime.model(name))

    @router.put("/models/{name}/workers")
    async def put_model_workers(request: Request, name: str) -> Response:
        """Resize a model's pool: body ``{"workers": N}``, as PUT /admin/workers."""
        return await resize(request, name)

    @router.put("/models/{name}", status_code=201)
    async def load_model(request: Request, name: str, wait: bool = True) -> Response:
        """Load a new model from its settings (a ``[models.NAME]`` table as JSON):
        201 once ready, 202 at once with ``?wait=false``, 409 if the name is served."""
        runtime = check(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise RequestError("send the model's settings as a JSON object")
        settings = model_settings(name, body, "request body")
        model = await runtime.load(name, settings, wait=wait)
        document = pool_document(runtime, model)
        document.status_code = 201 if wait else 202
        return document

    @router.delete("/models/{name}")
    async def unload_model(request: Request, name: str) -> Response:
        """Stop routing to the model (404 from now on), let in-flight requests finish,
        stop its workers and free its cores."""
        runtime = check(request)
        await runtime.unload(name)
        return json_response({"model": name, "unloaded": True})

    @router.post("/models/{name}/reload")
    async def reload_model(request: Request, name: str) -> Response:
        """Rolling reload: new workers load the model (the file again) and are ready
        before the old ones drain and stop. If they fail, the old ones serve on and
        the answer says why."""
        runtime = check(request)
        model = runtime.model(name)
        await model.reload()
        return pool_document(runtime, model)

    app.include_router(router)
