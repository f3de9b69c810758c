"""Elastic cores with real workers: a lone pass borrows idle cores, steady load keeps pins.

The handler (tests/elastic_zoo.py) reports what its pass ran with:
``torch.get_num_threads()``, the main thread's CPU mask and every thread's.
These need two usable cores (one per worker).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, wait_for
from tests.elastic_zoo import cores_of
from worker.pinning import ELASTIC_SPINCOUNT
from worker.serve.sizing import CONFIRM_EVERY

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="elastic cores need two usable cores"
)

PROBE = ("--handler", "tests.elastic_zoo:ThreadProbe", "--input-shape", "1")
ROW = {"input_tensor": [[0.0]]}


def probe(client: httpx.Client, path: str = "/predict") -> list[int]:
    response = client.post(path, json=ROW)
    assert response.status_code == 200, response.text
    row: list[int] = response.json()["prediction"][0]
    return row


def test_a_lone_request_borrows_the_idle_workers_core(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--workers", "2", ready=2)
    workers = server.health()["workers"]
    assert all(len(w["cores"]) == 1 for w in workers)
    threads, main, every, pid = probe(server.client)
    assert threads == 2
    assert cores_of(main) == cores_of(every) == {c for w in workers for c in w["cores"]}
    # Once the pass is over the worker is back on its own core (the next one
    # may borrow again: the other worker is still idle).
    own = next(w["cores"] for w in workers if w["pid"] == pid)
    assert set(own) < cores_of(every)


def test_a_lend_that_does_not_speed_the_pass_up_stops(serve: Callable[..., Server]) -> None:
    """ThreadProbe computes for a fixed time: a second thread cannot shorten its pass.

    The first lone passes borrow (not measured yet), the next ones run on the
    worker's own core to measure it; from then on the call is close (equal
    speeds), so the worker keeps to its own core but for one pass in
    CONFIRM_EVERY, which checks the call.
    """
    server = serve(*PROBE, "--workers", "2", ready=2)
    threads = [probe(server.client)[0] for _ in range(40)]
    assert threads[0] == 2, threads
    settled = threads[8:]
    assert settled.count(2) <= len(settled) // CONFIRM_EVERY + 1, threads


def test_steady_load_keeps_each_worker_on_its_own_core(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--workers", "2", "--max-batch-size", "1", ready=2)
    rows: list[list[int]] = []

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            # The first requests find the other worker idle, and may borrow.
            for _ in range(3):
                probe(http)
            rows.extend(probe(http) for _ in range(15))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    by_pid: dict[int, set[int]] = {}
    own_core = [row for row in rows if row[0] == 1]
    # A client that stalls longer than a pass lets the other worker borrow
    # for a pass now and then (it cannot tell); steady load is one core each.
    assert len(own_core) >= 0.8 * len(rows), rows
    for _, main, every, pid in own_core:
        assert len(cores_of(main)) == 1 and cores_of(every) == cores_of(main)
        by_pid.setdefault(pid, set()).update(cores_of(every))
    assert len(by_pid) == 2, by_pid
    first, second = by_pid.values()
    assert not first & second


def test_an_idle_models_cores_serve_another_model(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    config = tmp_path / "two.toml"
    config.write_text(
        "\n".join(
            f'[models.{name}]\nhandler = "tests.elastic_zoo:ThreadProbe"\n'
            "input_shape = [1]\nworkers = 1\n"
            for name in ("a", "b")
        )
    )
    server = serve("--config", str(config), ready=2)
    cores = {w["model"]: set(w["cores"]) for w in server.health()["workers"]}
    assert not cores["a"] & cores["b"]
    threads, _, every, _ = probe(server.client, "/predict/b")
    assert threads == 2
    assert cores_of(every) == cores["a"] | cores["b"]

    # /health and /metrics show it, at most a heartbeat later.
    def lent_pass_seen() -> bool:
        shown = {w["model"]: w["threads"] for w in server.health()["workers"]}
        return shown["b"] == 2 and shown["a"] is None

    wait_for(lent_pass_seen, 10, "the lent pass in /health")
    metrics = server.get("/metrics").text
    assert 'torchpool_forward_threads_bucket{le="1.0",model="b"} 0.0' in metrics
    assert 'torchpool_forward_threads_bucket{le="2.0",model="b"} 1.0' in metrics


@pytest.mark.parametrize("elastic", [True, False])
def test_every_thread_is_pinned_and_an_elastic_worker_spins_briefly(
    serve: Callable[..., Server], elastic: bool
) -> None:
    """An elastic worker is pinned only once torch has loaded (GNU OpenMP counts its
    cores then), every thread of it, and its OpenMP threads spin ELASTIC_SPINCOUNT turns."""
    flag = "--elastic-cores" if elastic else "--no-elastic-cores"
    server = serve(
        "--handler", "tests.elastic_zoo:PinProbe", "--input-shape", "1", "--workers", "2",
        "--max-batch-size", "1", flag, ready=2,
    )  # fmt: skip
    # Ready, before any pass: every thread of each worker, those started before
    # torch loaded too, runs on that worker's own core only.
    own = {w["pid"]: set(w["cores"]) for w in server.health()["workers"]}
    for pid, cores in own.items():
        for task in Path(f"/proc/{pid}/task").iterdir():
            assert os.sched_getaffinity(int(task.name)) == cores, (pid, task.name)
    spin, every, *_ = probe(server.client)
    assert spin == (ELASTIC_SPINCOUNT if elastic else -1)
    assert len(cores_of(every)) == (2 if elastic else 1)  # a lone pass borrows, or not


def test_no_elastic_cores_keeps_every_pass_on_its_own_core(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--workers", "2", "--no-elastic-cores", ready=2)
    threads, _, every, _ = probe(server.client)
    assert threads == 1
    assert len(cores_of(every)) == 1
