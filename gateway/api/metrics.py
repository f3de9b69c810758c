"""Prometheus metrics at ``GET /metrics``, and the recent-traffic window of the status page.

Each app owns its :class:`Metrics` and a private ``CollectorRegistry``, so two
apps in one process never share or clash over a series. Figures come from
three places, each as cheap as it can be on the request path:

- gRPC: the gRPC service (:mod:`gateway.api.grpc`) reports each call to
  :meth:`Metrics.observe_grpc`, by method, model and status code name.
- HTTP: :class:`MetricsMiddleware` (pure ASGI) times every request and counts
  it by route template, model and status code. A path that matched no route is
  labelled ``other``, so a scanner cannot blow up the label set; ``model`` is
  the served model an inference route's request was for (a name that is not
  served is ``""``, as on every other route), so it is bounded the same way.
  ``/predict`` is answered before the middleware and reports its own.
- Hooks: the dispatcher reports each request's wait before its first send to a
  worker (``Dispatcher.on_first_send``), the supervisor each unplanned worker
  death (``Supervisor.on_death``).
- The pool, read at scrape time by :class:`PoolCollector`: per-worker state,
  memory and counters, queue depth, and the batch sizes the workers report in
  their heartbeats. Nothing is recorded for these between scrapes.

Batch sizes are exported as the histogram ``torchpool_batch_rows`` (rows per
forward pass): workers send cumulative counts per exact size, the pool sums
them, and the collector folds them into fixed buckets (powers of two and
``--max-batch-size``) so the series count stays bounded whatever sizes occur.
"""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import generate, v2
from gateway.api.health import pool_status
from gateway.api.predict import PREDICT_NAMED, PREDICT_PATH
from gateway.api.stats import Tally
from gateway.pool.workers import SHOWN_STATES, DeathCause
from shared import protocol

if TYPE_CHECKING:
    from gateway.pool.model import ModelRuntime
    from gateway.pool.runtime import Runtime

NAMESPACE = "torchpool"
# Seconds; from a cached small tensor to a slow model under load.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)  # fmt: skip
# Seconds; most requests go straight to a worker and wait well under a millisecond.
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Worker states as /health shows them ("busy" is a ready worker computing).
STATES = SHOWN_STATES
# Known causes, exported at 0 from the start so rate() and alerts see them.
DEATH_CAUSES = tuple(cause.value for cause in DeathCause)
OTHER_ROUTE = "other"
# gRPC codes that are the client's doing (4xx over HTTP): not errors on the status page.
_CLIENT_CODES = frozenset(
    {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "CANCELLED", "ALREADY_EXISTS"}
)
RECENT_SIZE = 4096  # inference requests the status page's window can hold
RECENT_WINDOW_S = 10.0


# Routes ending so name their model in the path parameter ``name``.
MODEL_ROUTE_ENDS = (v2.INFER, generate.GENERATE, generate.GENERATE_STREAM)


def is_inference_route(route: str) -> bool:
    """Routes whose requests run the model: they feed the status page's window."""
    return route in (PREDICT_PATH, PREDICT_NAMED) or route.endswith(v2.INFER)


class RecentWindow:
    """The latest inference requests (when, how long, failed) in a fixed ring.

    Preallocated arrays, so recording allocates nothing; the summary (sorting at
    most ``size`` latencies) is paid by whoever asks, about once a second.
    """

    def __init__(self, size: int = RECENT_SIZE, clock: Callable[[], float] = time.monotonic):
        self._size = size
        self._clock = clock
        self._started = clock()
        self._at = array.array("d", bytes(8 * size))
        self._seconds = array.array("d", bytes(8 * size))
        self._failed = array.array("b", bytes(size))
        self._count = 0

    def add(self, seconds: float, failed: bool) -> None:
        i = self._count % self._size
        self._at[i] = self._clock()
        self._seconds[i] = seconds
        self._failed[i] = failed
        self._count += 1

    def summary(self, window_s: float = RECENT_WINDOW_S) -> dict[str, Any]:
        """Requests and errors (5xx) per second, and latency quantiles, over ``window_s``."""
        now = self._clock()
        since = now - window_s
        filled = min(self._count, self._size)
        latencies: list[float] = []
        errors = 0
        oldest = now
        for i in range(filled):
            at = self._at[i]
            if at >= since:
                latencies.append(self._seconds[i])
                errors += self._failed[i]
                oldest = min(oldest, at)
        # When the ring holds nothing older than the window, the window saw more
        # than the ring keeps: rates cover the span the ring does hold.
        span = min(window_s, now - self._started)
        if filled == self._size and len(latencies) == filled:
            span = now - oldest
        latencies.sort()
        count = len(latencies)
        return {
            "window_s": window_s,
            "requests": count,
            "requests_per_s": count / span if span > 0 else 0.0,
            "errors_per_s": errors / span if span > 0 else 0.0,
            "latency_p50_s": _quantile(latencies, 0.50),
            "latency_p99_s": _quantile(latencies, 0.99),
        }


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of a sorted list; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 1))  # ceil(n * q), at least 1
    return ordered[int(rank) - 1]


class _RouteSeries:
    """The labelled children of one route, looked up once and kept."""

    __slots__ = ("by_status", "duration", "inference", "model", "route")

    def __init__(self, metrics: Metrics, route: str, model: str) -> None:
        self.route = route
        self.model = model
        self.duration = metrics.request_duration.labels(route, model)
        self.by_status: dict[int, Any] = {}
        self.inference = is_inference_route(route)


class Metrics:
    """One app's registry and recorders; ``attach`` it to the app's Runtime once started."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, model and status code.",
            ["route", "model", "code"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "Time from receiving an HTTP request to the end of its answer, by route template "
            "and model.",
            ["route", "model"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a request waited in the gateway before it was first sent to a worker.",
            ["model"],
            namespace=NAMESPACE,
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.deaths = Counter(
            "worker_deaths",
            "Unplanned worker deaths, by cause: "
            + ", ".join(cause.explained for cause in DeathCause)
            + ".",
            ["model", "cause"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "grpc_requests",
            "gRPC calls answered, by method, model and status code.",
            ["method", "model", "code"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.grpc_duration = Histogram(
            "grpc_request_duration_seconds",
            "Time from receiving a gRPC call to the end of its answer, by method and model.",
            ["method", "model"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Inference requests by model and outcome, for Triton's statistics (gateway.api.stats).
        self.tallies: dict[str, Tally] = {}
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.runtime: Runtime | None = None
        self.registry.register(PoolCollector(self))
        self.recent = RecentWindow()
        self._routes: dict[tuple[str, str], _RouteSeries] = {}

    def attach(self, runtime: Runtime) -> None:
        """Read ``runtime``'s pools at scrape time, and take each model's dispatcher's and
        supervisor's reports (queue waits, worker deaths), models loaded later included."""
        self.runtime = runtime
        for model in runtime.models.values():
            self.watch(model)
        runtime.on_model_added = self.watch

    def watch(self, model: ModelRuntime) -> None:
        for cause in DEATH_CAUSES:
            self.deaths.labels(model.name, cause)
        model.dispatcher.on_first_send = self.queue_wait.labels(model.name).observe
        model.supervisor.on_death = lambda cause: self.deaths.labels(model.name, cause).inc()

    def observe_request(self, route: str, status: int, seconds: float, model: str = "") -> None:
        """One answered request; ``model``: the served model it was for, "" if none."""
        key = (route, model)
        series = self._routes.get(key)
        if series is None:
            series = self._routes[key] = _RouteSeries(self, route, model)
        counter = series.by_status.get(status)
        if counter is None:
            counter = series.by_status[status] = self.requests.labels(route, model, str(status))
        counter.inc()
        series.duration.observe(seconds)
        if series.inference:
            self.recent.add(seconds, status >= 500)
            if model:
                self._tally(model).add(seconds, status >= 400)

    def observe_grpc(
        self, method: str, code: str, seconds: float, model: str = "", inference: bool = False
    ) -> None:
        """One answered gRPC call; ``code``: its status code's name, such as ``OK``."""
        self.grpc_requests.labels(method, model, code).inc()
        self.grpc_duration.labels(method, model).observe(seconds)
        if inference:
            self.recent.add(seconds, code not in _CLIENT_CODES)
            if model:
                self._tally(model).add(seconds, code != "OK")

    def _tally(self, model: str) -> Tally:
        tally = self.tallies.get(model)
        if tally is None:
            tally = self.tallies[model] = Tally()
        return tally

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for (Prometheus text or OpenMetrics)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class MetricsMiddleware:
    """Times and counts every HTTP request; pure ASGI, so streaming is untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's own list, so routes added later count too

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The router leaves the matched route in the scope; its path is the template.
            route = getattr(scope.get("route"), "path", None) or self._template(scope)
            seconds = time.perf_counter() - started
            self.metrics.observe_request(route, status, seconds, self._model(scope, route))

    def _model(self, scope: Scope, route: str) -> str:
        """The served model an inference route's request was for; "" for any other."""
        if not route.endswith(MODEL_ROUTE_ENDS):
            return ""
        name = scope.get("path_params", {}).get("name")
        runtime = self.metrics.runtime
        if isinstance(name, str) and runtime is not None and name in runtime.models:
            return name
        return ""

    def _template(self, scope: Scope) -> str:
        """The route of a request answered before routing (a 401, say), or "other"."""
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return getattr(route, "path", None) or OTHER_ROUTE
        return OTHER_ROUTE


class PoolCollector:
    """Per-worker and pool figures, read from the pool records at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        runtime = self._metrics.runtime
        if runtime is None:
            return
        models = list(runtime.models.values())
        now = time.monotonic()
        label = ["model", "worker"]
        state = GaugeMetricFamily(
            f"{NAMESPACE}_worker_state",
            "1 for the state each worker is in, 0 for the others.",
            labels=["model", "worker", "state"],
        )
        rss = _gauge("worker_rss_bytes", "Resident memory of the worker process.", label)
        pss = _gauge(
            "worker_pss_bytes",
            "Proportional memory of the worker: its private pages plus its share of shared "
            "ones (the sum over workers is the memory they use; RSS double-counts).",
            label,
        )
        private = _gauge(
            "worker_private_bytes", "Memory only this worker maps (USS), part of its PSS.", label
        )
        shared_pss = _gauge(
            "worker_shared_pss_bytes",
            "This worker's share of memory mapped by several processes (e.g. shared weights).",
            label,
        )
        shared_weights = _gauge(
            "worker_shared_weights",
            "1 when the worker maps the host's one copy of the weights.",
            label,
        )
        cuda_allocated = _gauge(
            "worker_cuda_allocated_bytes", "CUDA memory held by tensors (CUDA workers).", label
        )
        cuda_reserved = _gauge(
            "worker_cuda_reserved_bytes",
            "CUDA memory reserved by the caching allocator (CUDA workers).",
            label,
        )
        load = _gauge("worker_load_seconds", "How long loading the model took.", label)
        inflight = _gauge("worker_inflight_requests", "Requests the worker holds now.", label)
        age = _gauge("worker_heartbeat_age_seconds", "Time since the worker was last heard.", label)
        served = CounterMetricFamily(
            f"{NAMESPACE}_worker_requests",
            "Requests the worker slot answered (starts over when a recycled worker is replaced).",
            labels=label,
        )
        restarts = CounterMetricFamily(
            f"{NAMESPACE}_worker_restarts",
            "Times the worker slot's process was replaced after a death.",
            labels=label,
        )
        for model in models:
            for worker in model.pool.serving():
                name = [model.name, str(worker.slot)]
                shown = worker.shown_state()
                for candidate in STATES:
                    state.add_metric([*name, candidate], 1.0 if candidate == shown else 0.0)
                _add(rss, name, worker.rss_bytes)
                _add(pss, name, worker.pss_bytes)
                _add(private, name, worker.private_bytes)
                _add(shared_pss, name, worker.shared_pss_bytes)
                if worker.weights is not None:
                    shared_weights.add_metric(name, 1.0 if worker.weights.get("shared") else 0.0)
                _add(cuda_allocated, name, worker.cuda_allocated_bytes)
                _add(cuda_reserved, name, worker.cuda_reserved_bytes)
                _add(load, name, worker.load_seconds)
                _add(age, name, worker.heartbeat_age(now))
                inflight.add_metric(name, len(worker.inflight))
                served.add_metric(name, worker.requests_served)
                restarts.add_metric(name, worker.restarts)
        yield from (state, rss, pss, private, shared_pss, shared_weights)
        yield from (cuda_allocated, cuda_reserved, load, inflight, age, served)
        yield restarts
        yield from _pool_gauges(models)
        batches = _histogram_family("batch_rows", BATCH_ROWS_HELP)
        waits = _histogram_family("batch_wait_seconds", BATCH_WAIT_HELP)
        threads = _histogram_family("forward_threads", FORWARD_THREADS_HELP)
        for model in models:
            pool = model.pool
            _add_batch_histogram(
                batches, model.name, pool.batch_rows, model.settings.max_batch_size
            )
            _add_wait_histogram(waits, model.name, pool.wait_counts, pool.wait_sum)
            # Same buckets as rows (1, 2, 4, ...), plus the most threads seen.
            most = max(pool.thread_passes, default=1)
            _add_batch_histogram(threads, model.name, pool.thread_passes, most)
        yield batches
        yield waits
        yield threads


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=labels)


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:  # not measured (yet, or not on this device): no sample
        family.add_metric(labels, value)


def _pool_gauges(models: list[ModelRuntime]) -> Iterable[Metric]:
    queued = _gauge("requests_queued", "Requests waiting in the gateway's queue for a worker.",
                    ["model"])  # fmt: skip
    inflight = _gauge(
        "requests_inflight", "Requests sent to a worker and not yet answered.", ["model"]
    )
    ready = _gauge(
        "workers_ready", "Workers ready to take requests (busy ones included).", ["model"]
    )
    total = _gauge("workers", "Worker slots in the pool.", ["model"])
    up = _gauge(
        "pool_status",
        "1 for the pool's /health status (ok, degraded, unavailable), 0 for the others.",
        ["model", "status"],
    )
    for model in models:
        pool, label = model.pool, [model.name]
        queued.add_metric(label, model.dispatcher.queued)
        inflight.add_metric(label, sum(len(w.inflight) for w in pool.all_records()))
        ready.add_metric(label, len(pool.ready_workers()))
        total.add_metric(label, len(pool.serving()))
        current = pool_status(pool)
        for status in ("ok", "degraded", "unavailable"):
            up.add_metric([model.name, status], 1.0 if status == current else 0.0)
    return (queued, inflight, ready, total, up)


BATCH_ROWS_HELP = (
    "Rows per forward pass the workers ran (from their heartbeats, at most one beat old)."
)
FORWARD_THREADS_HELP = (
    "Intra-op threads per forward pass: above a worker's own cores when the pass borrowed "
    "idle workers' cores (elastic cores; from the workers' heartbeats, at most one beat old)."
)
BATCH_WAIT_HELP = (
    "Seconds requests waited in a worker before their forward pass: what batching "
    "cost them (from the workers' heartbeats, at most one beat old)."
)


def _histogram_family(name: str, documentation: str) -> HistogramMetricFamily:
    return HistogramMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=["model"])


def _add_batch_histogram(
    family: HistogramMetricFamily, model: str, counts: dict[int, int], max_batch_size: int
) -> None:
    bounds = sorted({*BATCH_BUCKETS, max_batch_size})
    buckets: list[tuple[str, float]] = []
    for bound in bounds:
        below = sum(n for rows, n in counts.items() if rows <= bound)
        buckets.append((str(float(bound)), below))  # le="8.0", as Histogram writes it
    buckets.append(("+Inf", sum(counts.values())))
    family.add_metric([model], buckets, sum_value=sum(rows * n for rows, n in counts.items()))


def _add_wait_histogram(
    family: HistogramMetricFamily, model: str, counts: list[int], total_s: float
) -> None:
    buckets: list[tuple[str, float]] = []
    below = 0
    for bound, n in zip(protocol.WAIT_BUCKETS_S, counts, strict=False):
        below += n
        buckets.append((str(bound), below))
    buckets.append(("+Inf", sum(counts)))
    family.add_metric([model], buckets, sum_value=total_s)


def install(app: FastAPI, metrics: Metrics) -> None:
    """Add the timing middleware and ``GET /metrics`` to ``app``."""
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)

    async def scrape(request: Request) -> Response:
        """Prometheus metrics (text format; OpenMetrics when the scraper asks for it)."""
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    app.add_api_route("/metrics", scrape, methods=["GET"], response_class=Response)
