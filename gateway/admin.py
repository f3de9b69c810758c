"""Admin endpoints: resize the pool while it serves.

Off (404) unless --admin-token is set; then every call needs
``Authorization: Bearer <admin token>`` (401 with ``WWW-Authenticate`` without).
Scaling down drains the removed workers (they finish what they hold) before
they stop; nothing is dropped.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from gateway.auth import token_matches
from gateway.health import health_json
from gateway.http import json_response, runtime_of
from gateway.runtime import Runtime
from shared.errors import RequestError, Unauthorized

MAX_WORKERS = 256


def install(app: FastAPI, admin_token: str | None) -> None:
    """Add /admin routes to ``app`` when an admin token is configured."""
    if not admin_token:
        return
    token = admin_token.encode()
    router = APIRouter(prefix="/admin")

    def check(request: Request) -> Runtime:
        header = request.headers.get("authorization")
        if not token_matches(header.encode() if header else None, [token]):
            raise Unauthorized("the admin token is required: Authorization: Bearer TOKEN")
        return runtime_of(request)

    def pool_document(runtime: Runtime) -> Response:
        document: dict[str, Any] = {
            "target_workers": runtime.supervisor.target_workers,
            "health": health_json(runtime.pool),
        }
        return json_response(document)

    @router.get("/workers")
    async def get_workers(request: Request) -> Response:
        """The local pool's target size and its current health."""
        return pool_document(check(request))

    @router.put("/workers")
    async def put_workers(request: Request) -> Response:
        """Resize the local pool: body ``{"workers": N}``. New workers boot in the
        background; removed ones drain first. Answers with the pool as it is now."""
        runtime = check(request)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}") from exc
        count = body.get("workers") if isinstance(body, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_WORKERS:
            raise RequestError(f'send {{"workers": N}} with 0 <= N <= {MAX_WORKERS}')
        await runtime.supervisor.scale_to(count)
        return pool_document(runtime)

    app.include_router(router)
