"""Honest death causes, with fake processes: /health's last_death, last_error, the
log and the metric's cause agree, for each end the supervisor can tell apart.

The same worker ends in each of its ways; what is checked is the Death the
slot keeps (and keeps after the replacement is ready), and the cause the
``worker_deaths`` metric was given (planned ends are not deaths there).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from gateway.pool.deaths import OUTSIDE_SIGKILL, OomCounter
from gateway.pool.workers import DeathCause, WorkerRecord
from shared import protocol
from tests.fakes import eventually, on_loop
from tests.test_supervisor_fast import Gateway, gateway

pytestmark = pytest.mark.fast


async def died(gw: Gateway, worker: WorkerRecord, restarts: int = 1) -> None:
    """Until the slot's replacement has been spawned, and is ready."""
    await eventually(lambda: worker.restarts == restarts, "the replacement to be spawned")
    gw.ready(worker)


def agree(gw: Gateway, worker: WorkerRecord, cause: str, words: str, log: str) -> None:
    death = worker.last_death
    assert death is not None, "no last_death"
    assert death.cause == cause and words in death.reason, death
    assert worker.ready and worker.last_death is death  # kept once the replacement is ready
    assert gw.deaths == ([] if death.planned else [cause])
    assert words in log


@on_loop
async def test_a_crash_with_an_exit_code(caplog: pytest.LogCaptureFixture) -> None:
    gw = gateway(1)
    (worker,) = await gw.serving()
    gw.spawner.of(worker).exit(1)
    await died(gw, worker)
    agree(gw, worker, "exit", "exited with code 1", caplog.text)
    assert worker.last_death is not None and worker.last_death.to_json()["exit_code"] == 1


@on_loop
async def test_a_crash_by_a_signal(caplog: pytest.LogCaptureFixture) -> None:
    gw = gateway(1)
    (worker,) = await gw.serving()
    gw.spawner.of(worker).exit(-signal.SIGSEGV)
    await died(gw, worker)
    agree(gw, worker, "signal", "killed by SIGSEGV", caplog.text)
    assert worker.last_death is not None and worker.last_death.to_json()["signal"] == "SIGSEGV"


@on_loop
async def test_a_sigkill_we_did_not_send_is_from_outside(caplog: pytest.LogCaptureFixture) -> None:
    gw = gateway(1)
    (worker,) = await gw.serving()
    gw.spawner.of(worker).exit(-signal.SIGKILL)
    await died(gw, worker)
    agree(gw, worker, "killed_outside", OUTSIDE_SIGKILL, caplog.text)
    assert worker.last_error is None  # cleared when ready, as before; last_death stays


@on_loop
async def test_a_sigkill_the_cgroup_counts_as_an_oom_kill_is_named_so(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    gw = gateway(1, oom=OomCounter(events))
    (worker,) = await gw.serving()
    events.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    gw.spawner.of(worker).exit(-signal.SIGKILL)
    await died(gw, worker)
    agree(gw, worker, "oom", "OOM killer", caplog.text)


@on_loop
async def test_a_batch_past_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    gw = gateway(1, max_batch_seconds=3.0)
    (worker,) = await gw.serving()
    gw.say(worker, protocol.HEARTBEAT, batch_s=3.5)
    await died(gw, worker)
    # The supervisor's own SIGKILL: not "from outside", not "out of memory".
    agree(gw, worker, "batch_timeout", "its batch ran longer than 3 s", caplog.text)
    assert worker.last_death is not None and worker.last_death.signal == "SIGKILL"
    assert "OOM" not in worker.last_death.reason


@on_loop
async def test_missed_heartbeats(caplog: pytest.LogCaptureFixture) -> None:
    gw = gateway(1, heartbeat_liveness=3)
    (worker,) = await gw.serving()
    await gw.clock.advance(4.0)
    await died(gw, worker)
    agree(gw, worker, "heartbeat", "sent no heartbeat for", caplog.text)
    assert worker.last_death is not None and "hung" in worker.last_death.reason


@on_loop
async def test_a_recycle(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = gateway(1, max_requests_per_worker=1)
    (old,) = await gw.serving()
    gw.serve_one(old)
    await gw.spawned(2)
    (successor,) = gw.pool.handovers
    gw.ready(successor)
    await eventually(lambda: gw.pool.workers[0] is successor, "the hand-over")
    gw.spawner.of(old).exit(0)  # it drained and stopped
    await eventually(lambda: successor.last_death is not None, "the old worker's end")
    agree(gw, successor, "recycle", "recycled: served 1 requests", caplog.text)


@on_loop
async def test_a_reload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = gateway(1)
    (old,) = await gw.serving()
    reload = asyncio.ensure_future(gw.supervisor.reload())
    await gw.spawned(2)
    (successor,) = gw.pool.handovers
    gw.ready(successor)
    await reload
    gw.spawner.of(old).exit(0)
    await eventually(lambda: successor.last_death is not None, "the old worker's end")
    agree(gw, successor, "reload", "replaced by a reload", caplog.text)


@on_loop
async def test_a_scale_down_is_logged_as_such_and_is_no_death(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    gw = gateway(2)
    _, gone = await gw.serving()
    await gw.supervisor.scale_to(1)
    gw.spawner.of(gone).exit(0)
    await eventually(lambda: gone.last_death is not None, "the scaled-down worker's end")
    assert gone.last_death is not None and gone.last_death.cause == "scale_down"
    assert gw.deaths == [] and "stopped: scaled down" in caplog.text


@on_loop
async def test_a_dead_worker_found_unreachable_before_it_is_reaped_dies_of_what_killed_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = gateway(1)
    (worker,) = await gw.serving()
    gw.spawner.of(worker).exit(-signal.SIGKILL)  # killed; not reaped yet
    gw.supervisor.declare_lost(worker, "became unreachable", DeathCause.UNREACHABLE)
    await died(gw, worker)
    agree(gw, worker, "killed_outside", OUTSIDE_SIGKILL, caplog.text)
