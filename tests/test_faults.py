"""Real tier: workers crash, hang, recycle and drain; no request is lost or left hanging."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Server, wait_for
from tests.load import Load
from tests.test_metrics import scrape, value

ROW = [0.25] * 16
FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")


def worker(server: Server, slot: int) -> dict[str, object]:
    document: dict[str, object] = server.health()["workers"][slot]
    return document


def test_sigkilled_worker_is_replaced_and_its_requests_answered(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "2", *FAST_BEATS, ready=2)
    victim = int(str(worker(server, 0)["pid"]))
    with Load(server.url) as load:
        wait_for(lambda: load.answered > 20, 30, "load to flow")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker(server, 0)["restarts"] == 1, 10, "the death to be noticed")
        server.wait_ready(2, timeout_s=60)
        before = load.answered
        wait_for(lambda: load.answered > before + 20, 30, "load to flow again")
    assert load.errors == []
    assert set(load.statuses) == {200}, load.statuses
    replaced = worker(server, 0)
    assert replaced["pid"] != victim
    assert replaced["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in str(replaced["last_error"]) or replaced["last_error"] is None


def test_sigkill_is_reported_as_possible_oom(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1", *FAST_BEATS)
    victim = int(str(worker(server, 0)["pid"]))
    os.kill(victim, signal.SIGKILL)
    state = wait_for(
        lambda: (w := worker(server, 0))["exit_code"] == -signal.SIGKILL and w,
        10,
        "the kill to be recorded",
    )
    assert "possibly out of memory" in str(state["last_error"])
    server.wait_ready(1, timeout_s=60)


def test_stopped_worker_is_declared_dead_and_replaced(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2", *FAST_BEATS, ready=2)
    victim = int(str(worker(server, 1)["pid"]))
    os.kill(victim, signal.SIGSTOP)
    try:
        with Load(server.url, threads=2) as load:
            # 60 s: a wide margin over the 0.6 s of silence FAST_BEATS allow, not a speed.
            wait_for(lambda: worker(server, 1)["restarts"] == 1, 60, "the hang to be noticed")
            server.wait_ready(2, timeout_s=60)
        assert (
            "heartbeat" in str(worker(server, 1)["last_error"])
            or worker(server, 1)["last_error"] is None
        )
        # Noticed by its missed heartbeats, once (not by a deadline or a hello timeout).
        deaths = scrape(server)
        assert value(deaths, "torchpool_worker_deaths_total", model="demo", cause="heartbeat") == 1
        assert value(deaths, "torchpool_worker_deaths_total", model="demo", cause="signal") == 0
        assert load.errors == []
        assert set(load.statuses) <= {200}, load.statuses
    finally:
        if Path(f"/proc/{victim}").exists():
            os.kill(victim, signal.SIGCONT)


def test_long_forward_pass_is_not_a_hang(serve: Callable[..., Server]) -> None:
    server = serve(
        "--handler", "tests.zoo:SlowHandler", "--model-kwargs", '{"sleep_s": 2.0}',
        "--workers", "1", *FAST_BEATS,
    )  # fmt: skip
    response = server.predict({"input_tensor": [ROW]})
    assert response.status_code == 200
    assert worker(server, 0)["restarts"] == 0


def test_forward_that_never_returns_is_killed_and_not_retried(
    serve: Callable[..., Server],
) -> None:
    server = serve(
        "--handler", "tests.zoo:HangHandler", "--workers", "2", "--max-batch-seconds", "1",
        *FAST_BEATS, ready=2,
    )  # fmt: skip
    pids = {w["id"]: w["pid"] for w in server.health()["workers"]}
    hung = server.predict({"input_tensor": [[-1.0] * 16]})
    # Answered by the batch limit, before --timeout-s (30 s): past the deadline it
    # would be a 504, so the 503 naming the limit is the ordering, without a clock.
    assert hung.status_code == 503, hung.text
    assert hung.headers["retry-after"] == "1"
    assert "batch ran longer than 1 s" in hung.json()["error"]
    victim = wait_for(
        lambda: [w for w in server.health()["workers"]
                 if "batch ran longer than 1 s" in str(w["last_error"])],
        10, "/health to show why the worker was killed",
    )[0]  # fmt: skip
    wait_for(lambda: not psutil.pid_exists(pids[victim["id"]]), 10, "the hung worker to die")
    # Not retried: the other worker never saw the request, so it serves on untouched.
    other = worker(server, 1 - victim["id"])
    assert other["pid"] == pids[other["id"]] and other["restarts"] == 0
    assert server.predict({"input_tensor": [ROW]}).status_code == 200
    server.wait_ready(2, timeout_s=60)
    replaced = worker(server, victim["id"])
    assert replaced["restarts"] == 1 and replaced["pid"] != pids[victim["id"]]


def test_model_that_stops_loading_ends_failed_not_restarted_forever(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    poison = tmp_path / "poison"
    server = serve(
        "--handler", "tests.zoo:PoisonableHandler",
        "--model-kwargs", f'{{"poison": "{poison}"}}', "--workers", "2", *FAST_BEATS, ready=2,
    )  # fmt: skip
    poison.touch()
    os.kill(int(str(worker(server, 0)["pid"])), signal.SIGKILL)
    failed = wait_for(lambda: (w := worker(server, 0))["state"] == "failed" and w, 60, "failed")
    assert "poisoned" in str(failed["last_error"])
    health = server.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert server.predict({"input_tensor": [ROW]}).status_code == 200


def test_recycling_swaps_workers_without_dropping_a_request(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "1", "--max-requests-per-worker", "40", *FAST_BEATS)
    first = worker(server, 0)["pid"]
    with Load(server.url, threads=3) as load:
        wait_for(lambda: worker(server, 0)["pid"] != first, 60, "a recycle")
        second = worker(server, 0)["pid"]
        wait_for(lambda: worker(server, 0)["pid"] != second, 60, "a second recycle")
    assert load.errors == []
    assert set(load.statuses) == {200}, load.statuses
    assert worker(server, 0)["restarts"] == 0


def test_deadline_gives_504(serve: Callable[..., Server]) -> None:
    server = serve(
        "--handler", "tests.zoo:SlowHandler", "--model-kwargs", '{"sleep_s": 6.0}',
        "--workers", "1", "--timeout-s", "1",
        # Deadlines only: the batch limit (default --timeout-s) would kill the
        # sleeping worker and answer the second request 503 instead.
        "--max-batch-seconds", "0",
    )  # fmt: skip
    response = server.predict({"input_tensor": [ROW]})
    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"
    # Answered at the deadline (1 s), not when the forward pass ends (6 s): the
    # worker still holds the request and has served nothing. The 5 s between the
    # two is the margin (the /health call below takes milliseconds); no clock is
    # read here.
    [held] = server.health()["workers"]
    assert (held["inflight"], held["requests_served"]) == (1, 0), held
    shorter = server.client.post(
        "/predict", json={"input_tensor": [ROW]}, headers={"x-request-timeout": "0.2"}
    )
    assert shorter.status_code == 504
    bad = server.client.post(
        "/predict", json={"input_tensor": [ROW]}, headers={"x-request-timeout": "soon"}
    )
    assert bad.status_code == 400


def test_full_queue_is_503_with_retry_after(serve: Callable[..., Server]) -> None:
    server = serve(
        "--handler", "tests.zoo:SlowHandler", "--model-kwargs", '{"sleep_s": 1.0}',
        "--workers", "1", "--max-batch-size", "1", "--queue-size", "1",
    )  # fmt: skip
    results: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            results.append(client.post("/predict", json={"input_tensor": [ROW]}))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = Counter(r.status_code for r in results)
    assert statuses[503] >= 1, statuses
    assert statuses[200] >= 3, statuses  # two held by the worker, one queued
    rejected = next(r for r in results if r.status_code == 503)
    assert rejected.headers["retry-after"]
    assert "queue is full" in rejected.json()["error"]


@pytest.mark.parametrize("second_signal", [False, True])
def test_sigterm_drains_in_flight_work(serve: Callable[..., Server], second_signal: bool) -> None:
    # With a second signal, the request must still be running when it comes: 10 s
    # is a wide margin over readiness flipping; without, the drain waits out 2 s.
    sleep_s = 10.0 if second_signal else 2.0
    server = serve(
        "--handler", "tests.zoo:SlowHandler", "--model-kwargs", f'{{"sleep_s": {sleep_s}}}',
        "--workers", "1", "--drain-timeout-s", "20",
    )  # fmt: skip
    results: list[httpx.Response | Exception] = []

    def call() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                results.append(client.post("/predict", json={"input_tensor": [ROW]}))
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: worker(server, 0)["inflight"] == 1, 10, "the request to be in flight")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: httpx.get(f"{server.url}/health/ready").status_code == 503,
        5,
        "readiness to flip",
    )
    if second_signal:
        server.proc.send_signal(signal.SIGTERM)
    # 60 s: a wide margin over the longest stop (the 2 s drained, or the 10 s
    # forward pass of a worker asked to stop), not a speed asserted.
    code = server.proc.wait(60)
    thread.join(60)
    assert code == 0, server.log()
    if second_signal:
        # The second signal answers what was still in flight, and stops at once:
        # a 503 while the forward pass (10 s) and the drain (20 s) had time to
        # run, so the gateway did not wait for either; no clock is read here.
        assert isinstance(results[0], httpx.Response), results
        assert results[0].status_code == 503
        assert "shutting down" in results[0].json()["error"]
    else:
        assert isinstance(results[0], httpx.Response) and results[0].status_code == 200
