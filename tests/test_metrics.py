"""Prometheus /metrics: fast checks of the pieces, then a real pool scraped over HTTP.

The real tests read deltas between two scrapes, parsed with prometheus-client's
own parser, so they hold whatever ran before them on the shared demo server.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.app import create_app
from gateway.api.metrics import (
    BATCH_ROWS_HELP,
    DEATH_CAUSES,
    RecentWindow,
    _add_batch_histogram,
    _histogram_family,
)
from gateway.pool.placement import Placement
from gateway.pool.workers import Pool
from shared import protocol
from shared.config import ServeSettings
from tests.conftest import Server, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ROW = [0.1 * i for i in range(16)]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(server: Server) -> Samples:
    response = server.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request straight into the ASGI app, without its lifespan (no workers)."""

    async def request() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(request())


# --- fast tier: no processes ------------------------------------------------------


@pytest.mark.fast
def test_each_app_has_its_own_registry() -> None:
    first, second = create_app(ServeSettings()), create_app(ServeSettings())
    for _ in range(3):
        assert get(first, "/no/such/path").status_code == 404
    assert get(second, "/no/such/path").status_code == 404
    one, two = parse(get(first, "/metrics").text), parse(get(second, "/metrics").text)
    key = {"route": "other", "model": "", "code": "404"}
    assert value(one, "torchpool_http_requests_total", **key) == 3
    assert value(two, "torchpool_http_requests_total", **key) == 1
    # Unknown paths never become labels of their own.
    assert not any("/no/such/path" in dict(labels).values() for _, labels in one)


@pytest.mark.fast
def test_requests_refused_before_routing_keep_their_route() -> None:
    app = create_app(ServeSettings(api_key="secret"))

    async def refused() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.post("/predict", json={"input_tensor": [[1.0]]})
            return response.status_code

    assert asyncio.run(refused()) == 401
    samples = parse(get(app, "/metrics").text)
    # Refused before it named a model: no model label.
    key = {"route": "/predict", "model": "", "code": "401"}
    assert value(samples, "torchpool_http_requests_total", **key) == 1


@pytest.mark.fast
def test_openmetrics_when_the_scraper_asks() -> None:
    app = create_app(ServeSettings())
    response = get(app, "/metrics", {"accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


@pytest.mark.fast
def test_recent_window_rates_and_quantiles() -> None:
    now = [100.0]
    window = RecentWindow(size=8, clock=lambda: now[0])
    assert window.summary(10.0)["latency_p50_s"] is None
    now[0] = 120.0  # the gateway has run longer than the window
    for ms in range(1, 6):
        window.add(ms / 1000, failed=ms == 5)
    summary = window.summary(10.0)
    assert summary["requests"] == 5
    assert summary["requests_per_s"] == pytest.approx(0.5)
    assert summary["errors_per_s"] == pytest.approx(0.1)
    assert summary["latency_p50_s"] == pytest.approx(0.003)
    assert summary["latency_p99_s"] == pytest.approx(0.005)
    now[0] = 140.0
    assert window.summary(10.0)["requests"] == 0


@pytest.mark.fast
def test_recent_window_that_overflows_reports_the_span_it_holds() -> None:
    now = [1000.0]
    window = RecentWindow(size=4, clock=lambda: now[0])
    for i in range(10):
        now[0] = 1000.0 + i * 0.1
        window.add(0.001, failed=False)
    # The ring holds the last 4, 0.3 s apart end to end: about 13 req/s.
    assert window.summary(10.0)["requests_per_s"] == pytest.approx(4 / 0.3)


@pytest.mark.fast
def test_batches_from_heartbeats_add_up_across_restarts() -> None:
    pool = Pool([Placement(0, "cpu", None, (0,))])
    worker = pool.workers[0]
    pool.take_batches(worker, [[1, 2], [4, 1]])
    pool.take_batches(worker, [[1, 3], [4, 1], [9, 1]])
    assert pool.batch_rows == {1: 3, 4: 1, 9: 1}
    worker.new_generation(pool.next_generation())  # a replacement process starts at zero
    pool.take_batches(worker, [[1, 1]])
    assert pool.batch_rows == {1: 4, 4: 1, 9: 1}
    pool.take_batches(worker, [["x", 1], [2], "junk", [3, -1]])  # malformed: ignored
    assert pool.batch_rows == {1: 4, 4: 1, 9: 1}


@pytest.mark.fast
def test_wait_counts_add_up_across_heartbeats_and_restarts() -> None:
    pool = Pool([Placement(0, "cpu", None, (0,))])
    worker = pool.workers[0]
    size = len(protocol.WAIT_BUCKETS_S) + 1
    first = [2] + [0] * (size - 1)
    pool.take_waits(worker, {"counts": first, "sum": 0.0001})
    pool.take_waits(worker, {"counts": [3, 1] + [0] * (size - 2), "sum": 0.0004})
    assert pool.wait_counts[:2] == [3, 1] and sum(pool.wait_counts) == 4
    assert pool.wait_sum == pytest.approx(0.0004)
    worker.new_generation(pool.next_generation())  # a replacement process starts at zero
    pool.take_waits(worker, {"counts": [1] + [0] * (size - 1), "sum": 0.00005})
    assert sum(pool.wait_counts) == 5
    assert pool.wait_sum == pytest.approx(0.00045)
    pool.take_waits(worker, {"counts": [1, 2], "sum": 1.0})  # wrong length: ignored
    pool.take_waits(worker, "junk")
    assert sum(pool.wait_counts) == 5


@pytest.mark.fast
def test_batch_histogram_buckets_include_the_max_batch_size() -> None:
    family = _histogram_family("batch_rows", BATCH_ROWS_HELP)
    _add_batch_histogram(family, "demo", {1: 4, 3: 1, 9: 1, 5000: 1}, max_batch_size=12)
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("torchpool_batch_rows_bucket", "1.0")] == 4
    assert samples[("torchpool_batch_rows_bucket", "4.0")] == 5
    assert samples[("torchpool_batch_rows_bucket", "12.0")] == 6
    assert samples[("torchpool_batch_rows_bucket", "1024.0")] == 6
    assert samples[("torchpool_batch_rows_bucket", "+Inf")] == 7
    assert samples[("torchpool_batch_rows_count", None)] == 7
    assert samples[("torchpool_batch_rows_sum", None)] == 4 + 3 + 9 + 5000


# --- real tier: a running pool ----------------------------------------------------


def test_requests_move_the_counters_by_exactly_what_was_sent(demo_server: Server) -> None:
    before = scrape(demo_server)
    for rows in (1, 2, 5):  # one at a time: each runs as a batch of its own
        response = demo_server.predict({"input_tensor": [ROW] * rows})
        assert response.status_code == 200, response.text
    assert demo_server.predict({"input_tensor": [[1.0, 2.0]]}).status_code == 422
    bad_timeout = demo_server.client.post(
        "/predict", json={"input_tensor": [ROW]}, headers={"x-request-timeout": "soon"}
    )
    assert bad_timeout.status_code == 400
    assert demo_server.get("/definitely/not/here").status_code == 404
    after = scrape(demo_server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "torchpool_http_requests_total"
    predict = {"route": "/predict", "model": "demo"}  # the one model takes plain /predict
    assert moved(requests, **predict, code="200") == 3
    assert moved(requests, **predict, code="422") == 1
    assert moved(requests, **predict, code="400") == 1
    assert moved(requests, route="other", model="", code="404") == 1
    assert moved("torchpool_http_request_duration_seconds_count", **predict) == 5
    assert moved("torchpool_http_request_duration_seconds_sum", **predict) > 0
    # The 400 never reached the dispatcher; the 422 did (the worker checks shapes).
    assert moved("torchpool_queue_wait_seconds_count", model="demo") == 4
    assert value(after, "torchpool_requests_queued", model="demo") == 0
    assert value(after, "torchpool_requests_inflight", model="demo") == 0

    # Batch sizes arrive with the workers' next heartbeats.
    def batches_seen() -> Samples | None:
        now = scrape(demo_server)
        count = "torchpool_batch_rows_count"
        return (
            now
            if value(now, count, model="demo") - value(before, count, model="demo") >= 3
            else None
        )

    latest = wait_for(batches_seen, 10.0, "batch sizes in the workers' heartbeats")

    def grew(name: str, **labels: str) -> float:
        return value(latest, name, **labels) - value(before, name, **labels)

    assert grew("torchpool_batch_rows_count", model="demo") == 3
    assert grew("torchpool_batch_rows_sum", model="demo") == 8
    assert grew("torchpool_batch_rows_bucket", model="demo", le="1.0") == 1
    assert grew("torchpool_batch_rows_bucket", model="demo", le="2.0") == 2
    assert grew("torchpool_batch_rows_bucket", model="demo", le="4.0") == 2
    assert grew("torchpool_batch_rows_bucket", model="demo", le="8.0") == 3
    # Each of the three waited in its worker (one at a time: almost nothing) before its forward.
    assert grew("torchpool_batch_wait_seconds_count", model="demo") == 3
    assert 0 <= grew("torchpool_batch_wait_seconds_sum", model="demo") < 1.0
    assert grew("torchpool_batch_wait_seconds_bucket", model="demo", le="+Inf") == 3


def _gauges_match_health(server: Server) -> bool:
    """One consistent reading: /health, /metrics, /health again, with nothing changed."""
    first = server.health()
    samples = scrape(server)
    second = server.health()
    fields = ("state", "rss_bytes", "requests_served", "inflight", "restarts", "load_seconds")
    if [[w[f] for f in fields] for w in first["workers"]] != [
        [w[f] for f in fields] for w in second["workers"]
    ]:
        return False  # a heartbeat landed in between; read again
    assert value(samples, "torchpool_workers", model="demo") == second["total_workers"]
    assert value(samples, "torchpool_workers_ready", model="demo") == second["ready_workers"]
    assert value(samples, "torchpool_pool_status", model="demo", status=second["status"]) == 1
    for worker in second["workers"]:
        name = str(worker["id"])
        assert (
            value(
                samples, "torchpool_worker_state", model="demo", worker=name, state=worker["state"]
            )
            == 1
        )
        states = [v for (n, labels), v in samples.items() if n == "torchpool_worker_state"
                  and dict(labels)["worker"] == name]  # fmt: skip
        assert sum(states) == 1
        assert (
            value(samples, "torchpool_worker_rss_bytes", model="demo", worker=name)
            == worker["rss_bytes"]
        )
        assert value(
            samples, "torchpool_worker_load_seconds", model="demo", worker=name
        ) == pytest.approx(worker["load_seconds"])
        served = value(samples, "torchpool_worker_requests_total", model="demo", worker=name)
        assert served == worker["requests_served"]
        assert value(samples, "torchpool_worker_inflight_requests", model="demo", worker=name) == 0
        assert (
            value(samples, "torchpool_worker_restarts_total", model="demo", worker=name)
            == worker["restarts"]
        )
        age = value(samples, "torchpool_worker_heartbeat_age_seconds", model="demo", worker=name)
        assert 0 <= age < 5
        # CPU workers have no CUDA figures: no sample rather than a made-up zero.
        assert (
            "torchpool_worker_cuda_allocated_bytes",
            (("model", "demo"), ("worker", name)),
        ) not in samples
    return True


def test_per_worker_gauges_match_health(demo_server: Server) -> None:
    demo_server.predict({"input_tensor": [ROW]})
    wait_for(lambda: _gauges_match_health(demo_server), 10.0, "a reading without a heartbeat")


def test_gateway_process_metrics(demo_server: Server) -> None:
    samples = scrape(demo_server)
    assert value(samples, "process_resident_memory_bytes") > 0
    assert ("process_cpu_seconds_total", ()) in samples
    assert all(
        ("torchpool_worker_deaths_total", (("cause", c), ("model", "demo"))) in samples
        for c in DEATH_CAUSES
    )


def test_a_killed_worker_is_counted_as_a_death_by_signal(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "2", ready=2)
    victim = server.health()["workers"][0]
    assert value(scrape(server), "torchpool_worker_deaths_total", model="demo", cause="signal") == 0
    os.kill(victim["pid"], signal.SIGKILL)

    def counted() -> Samples | None:
        samples = scrape(server)
        return (
            samples
            if value(samples, "torchpool_worker_restarts_total", model="demo", worker="0")
            else None
        )

    samples = wait_for(counted, 30.0, "the worker's death in the metrics")
    assert value(samples, "torchpool_worker_deaths_total", model="demo", cause="signal") == 1
    assert value(samples, "torchpool_worker_deaths_total", model="demo", cause="exit") == 0
    assert value(samples, "torchpool_worker_deaths_total", model="demo", cause="heartbeat") == 0
    # The replacement comes back ready, and the count stays at one.
    server.wait_ready(2)
    assert value(scrape(server), "torchpool_worker_deaths_total", model="demo", cause="signal") == 1
