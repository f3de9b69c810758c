"""Real tier: nothing fails that could have waited.

A request that arrives while its model's workers are all being replaced waits
in the queue for a replacement instead of getting 503; a model whose workers
die while they boot (a crash loop) still answers 503 at once. Real workers,
real ZeroMQ, real HTTP.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Server, wait_for
from tests.load import ROW, Load

FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")


def pids(server: Server) -> list[int]:
    return [int(w["pid"]) for w in server.health()["workers"] if w["pid"] is not None]


def test_killing_every_worker_under_load_answers_every_request_200(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "2", *FAST_BEATS, ready=2)
    victims = pids(server)
    with Load(server.url, threads=6) as load:
        wait_for(lambda: load.answered > 20, 30, "load to flow")
        for victim in victims:
            os.kill(victim, signal.SIGKILL)
        # Both slots had a new process and both are ready: the pool came back.
        wait_for(
            lambda: not set(pids(server)) & set(victims) and server.health()["ready_workers"] == 2,
            90,
            "two replacements to be ready",
        )
        before = load.answered
        wait_for(lambda: load.answered > before + 20, 30, "load to flow again")
    assert load.errors == [], load.errors[:5]
    assert load.sent == load.answered
    # Every request sent while no worker was ready waited for a replacement.
    assert set(load.statuses) == {200}, (load.statuses, load.refusals)
    assert all(w["restarts"] == 1 for w in server.health()["workers"])


def test_a_crash_looping_model_answers_503_at_once(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    poison = tmp_path / "poison"
    server = serve(
        "--handler", "tests.zoo:PoisonableHandler",
        "--model-kwargs", f'{{"poison": "{poison}"}}',
        "--workers", "1", "--timeout-s", "120", *FAST_BEATS,
    )  # fmt: skip
    poison.touch()  # every replacement fails to load from now on
    os.kill(pids(server)[0], signal.SIGKILL)
    # The first replacement's failure may still be waited out (one boot failure
    # can be bad luck); from the second one on, the slot is in a crash loop.
    # Either way no request waits for its 120 s deadline.
    # It may wait through two boots (each several seconds on a busy machine): the
    # client waits as long as the server's deadline, not the fixture's 30 s.
    first = server.client.post("/predict", json={"input_tensor": [ROW]}, timeout=150)
    assert first.status_code == 503, first.text
    assert "crash loop" in first.json()["error"], first.json()
    assert "poisoned" in first.json()["error"]
    assert first.headers["Retry-After"]
    again = server.predict({"input_tensor": [ROW]})
    assert again.status_code == 503 and "crash loop" in again.json()["error"]
