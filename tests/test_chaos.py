"""Real tier: chaos. Workers are SIGKILLed and SIGSTOPped, one at a time, under load.

Four client threads keep posting to a two-worker pool on loopback while the test
hits a worker, measures how long the gateway takes to notice and to have two
ready workers again, and moves on to the next hit. Every request must get an
HTTP answer, and every answer must be 200: a dead worker's requests are retried
on the other one, so the clients never see the deaths. The figures are printed
(`pytest -s`) and recorded in README's "Reliability" section.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

from tests.conftest import Server, wait_for
from tests.load import Load

BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")
# (signal, slot) in order: kills and stops alternate over both slots.
HITS = [
    (signal.SIGKILL, 0),
    (signal.SIGSTOP, 1),
    (signal.SIGKILL, 1),
    (signal.SIGSTOP, 0),
    (signal.SIGKILL, 0),
    (signal.SIGSTOP, 1),
]
# Hits go on while the chaos is younger than this, and at least MIN_HITS are made
# (a kill, a stop, a kill); each waits for the pool to boot a replacement.
CHAOS_BUDGET_S = 30.0
MIN_HITS = 3
# Generous: two cores shared with other test runs; a replacement imports torch.
DETECT_TIMEOUT_S = 15.0
RECOVER_TIMEOUT_S = 60.0


def slot(server: Server, index: int) -> dict[str, Any]:
    document: dict[str, Any] = server.health()["workers"][index]
    return document


def noticed(worker: dict[str, Any], restarts: int) -> bool:
    """The gateway has given up on the slot's process.

    A SIGKILL is seen when the process is reaped and the slot's restart count
    goes up. A SIGSTOP is seen when the heartbeats stop: the slot turns
    ``restarting`` (its requests are settled then), while the restart count
    only moves once the stopped process has been made to exit.
    """
    return bool(worker["restarts"] > restarts or worker["state"] == "restarting")


def pool_recovered(server: Server, index: int, victim: int) -> bool:
    health = server.health()
    return bool(health["ready_workers"] == 2 and health["workers"][index]["pid"] != victim)


def test_pool_rides_out_kills_and_stops_under_load(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2", *BEATS, ready=2)
    detect: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    recover: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    victims: list[int] = []
    started = time.monotonic()
    with Load(server.url) as load:
        wait_for(lambda: load.answered > 20, 30, "load to flow")
        for done, (sig, index) in enumerate(HITS):
            if done >= MIN_HITS and time.monotonic() - started > CHAOS_BUDGET_S:
                break
            before = slot(server, index)
            victim, restarts = int(before["pid"]), int(before["restarts"])
            victims.append(victim)
            answered = load.answered
            hit_at = time.monotonic()
            os.kill(victim, sig)
            try:
                wait_for(
                    lambda: noticed(slot(server, index), restarts),  # noqa: B023
                    DETECT_TIMEOUT_S,
                    f"{sig.name} of worker {index} to be noticed",
                    interval_s=0.01,
                )
                detect[sig.name].append(time.monotonic() - hit_at)
                wait_for(
                    lambda: pool_recovered(server, index, victim),  # noqa: B023
                    RECOVER_TIMEOUT_S,
                    "two ready workers again",
                    interval_s=0.02,
                )
                recover[sig.name].append(time.monotonic() - hit_at)
            finally:
                if sig == signal.SIGSTOP:  # the supervisor kills it; never leave one stopped
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGCONT)
            # Some traffic between hits, so every hit lands on a busy pool.
            wait_for(lambda: load.answered > answered + 10, 30, "load to flow again")  # noqa: B023
    elapsed = time.monotonic() - started

    non_200 = {status: n for status, n in load.statuses.items() if status != 200}
    print(
        f"\nchaos: {len(victims)} hits in {elapsed:.1f}s; requests sent {load.sent}, "
        f"answered {load.answered}, non-200 {non_200 or 0}, connection errors "
        f"{len(load.errors)}, slowest answer {load.slowest_s:.2f}s"
    )
    health = server.health()
    boots = ", ".join(f"{w['load_seconds']:.1f}s" for w in health["workers"])
    print(f"chaos: the last replacements loaded the model in {boots} (under the load)")
    for name in ("SIGKILL", "SIGSTOP"):
        print(
            f"chaos: {name}: detected in {_spread(detect[name])}, "
            f"two ready again in {_spread(recover[name])}"
        )

    assert load.errors == [], load.errors[:5]
    assert load.sent == load.answered  # every request got an HTTP answer
    assert non_200 == {}, load.statuses
    assert health["status"] == "ok"
    assert sum(w["restarts"] for w in health["workers"]) >= len(victims)
    # A stop is found by heartbeat silence: 3 beats of 0.2 s, plus slack for a busy box.
    assert max(detect["SIGSTOP"]) < 5.0, detect
    # No orphans: every victim is gone (reaped), killed or stopped alike.
    for victim in victims:
        wait_for(lambda: not psutil.pid_exists(victim), 10, f"victim {victim} to be reaped")  # noqa: B023
    assert server.stop() == 0
    assert server.children() == []


def _spread(samples: list[float]) -> str:
    if not samples:
        return "n/a"
    return (
        f"median {statistics.median(samples):.2f}s (min {min(samples):.2f}, "
        f"max {max(samples):.2f}, n={len(samples)})"
    )
