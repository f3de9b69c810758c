"""The live status page at ``GET /`` (and ``/status``), and the ``/status.json`` it polls.

The page is one static HTML file with a little vanilla JavaScript, no build
step: every second it fetches ``/health`` (the workers) and ``/status.json``
(traffic over the last seconds, from :class:`gateway.api.metrics.RecentWindow`)
and redraws itself.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from gateway.api.health import pool_status
from gateway.api.metrics import Metrics

PAGE = "static/status.html"


def page_html() -> bytes:
    return resources.files("gateway.api").joinpath(PAGE).read_bytes()


def status_json(metrics: Metrics, started: float) -> dict[str, Any]:
    """What the page shows besides /health: traffic, queue, and the served model."""
    document: dict[str, Any] = {
        "uptime_s": round(time.monotonic() - started, 3),
        "traffic": metrics.recent.summary(),
    }
    runtime = metrics.runtime
    if runtime is not None:
        models = list(runtime.models.values())
        statuses = {pool_status(m.pool) for m in models}
        document.update(
            model=", ".join(runtime.models),
            status=statuses.pop() if len(statuses) == 1 else "degraded",
            queued=sum(m.dispatcher.queued for m in models),
            inflight=sum(len(w.inflight) for m in models for w in m.pool.all_records()),
            draining=runtime.draining,
        )
    return document


def install(app: FastAPI, metrics: Metrics) -> None:
    """Add ``GET /`` and ``GET /status`` (HEAD too) and ``GET /status.json`` to ``app``."""
    html = page_html()  # read once: the page is static
    started = time.monotonic()

    async def page() -> Response:
        """The live status page."""
        return Response(html, media_type="text/html", headers={"cache-control": "no-cache"})

    async def status() -> Response:
        """Traffic over the last seconds (req/s, errors/s, latency p50/p99) and the queue."""
        return Response(
            orjson.dumps(status_json(metrics, started)),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    for path in ("/", "/status"):
        # HEAD as GET, without the body (starlette drops it): link checkers and
        # uptime probes ask with HEAD.
        app.add_api_route(path, page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/status.json", status, methods=["GET"], response_class=Response)
