"""The supervisor's acts, with fake processes, an in-memory wire and a fake clock.

Deaths settle requests at once, silence is counted in missed heartbeats,
restarts back off, a crash loop ends in ``failed``, recycling hands over to a
ready successor first. No process starts and no test waits for real time; the
same paths with real workers are in test_faults.py, test_lifecycle.py and
test_chaos.py.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.pool.deaths import OomCounter
from gateway.pool.dispatch import Dispatcher
from gateway.pool.placement import Placement
from gateway.pool.succession import RECYCLE_RETRY_S
from gateway.pool.supervisor import Supervisor
from gateway.pool.workers import Pool, Role, State, WorkerRecord
from shared import protocol
from shared.config import ServeSettings
from shared.errors import Unavailable
from shared.restarts import BACKOFF_BASE_S, BACKOFF_MAX_S, MAX_BOOT_FAILURES
from tests.fakes import FakeClock, FakeSpawner, FakeTransport, eventually, on_loop

pytestmark = pytest.mark.fast


@dataclass
class Gateway:
    """A supervisor and its dispatcher, wired as Runtime wires them, over fakes."""

    settings: ServeSettings
    pool: Pool
    wire: FakeTransport
    dispatcher: Dispatcher
    supervisor: Supervisor
    spawner: FakeSpawner
    clock: FakeClock
    fatal: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)

    async def start(self) -> None:
        """Spawn every slot; return once the heartbeat loop waits on the clock."""
        await self.supervisor.start()
        await eventually(lambda: self.clock.sleeping, "the heartbeat loop to sleep")

    async def spawned(self, count: int) -> None:
        await eventually(lambda: len(self.spawner.processes) == count, f"{count} processes")

    def say(self, worker: WorkerRecord, kind: str, **fields: Any) -> None:
        """A control message from ``worker``'s process."""
        self.supervisor.on_control(worker, {"t": kind, **fields})

    def ready(self, worker: WorkerRecord, capacity: int = 1) -> None:
        self.say(worker, protocol.HELLO, pid=self.spawner.of(worker).pid)
        self.say(worker, protocol.READY, capacity=capacity, load_s=0.1)
        assert worker.ready

    async def serving(self) -> list[WorkerRecord]:
        """Start, and have every slot's worker ready; returns the workers."""
        await self.start()
        for worker in self.pool.workers:
            self.ready(worker)
        return list(self.pool.workers)

    def serve_one(self, worker: WorkerRecord) -> None:
        """``worker`` answers one request (past --max-requests-per-worker, it is due a recycle)."""
        self.answer(worker, self.dispatcher.enqueue("json", b"{}").id)

    def answer(self, worker: WorkerRecord, request_id: int) -> None:
        """A successful REPLY from ``worker``, routed as Runtime routes it."""
        header = {"t": protocol.REPLY, "id": request_id, "code": protocol.OK, "fmt": "json"}
        self.dispatcher.on_reply(worker, header, [b"{}"])
        self.supervisor.check_recycle(worker)


def gateway(
    workers: int,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    oom: OomCounter | None = None,
    **settings: Any,
) -> Gateway:
    config = ServeSettings(workers=workers, device="cpu", heartbeat_s=1.0, **settings)
    pool = Pool([Placement(slot, "cpu", None, (slot,)) for slot in range(workers)])
    wire = FakeTransport()
    dispatcher = Dispatcher(pool, wire, config.queue_size, config.timeout_s)
    spawner = FakeSpawner()
    clock = FakeClock()
    fatal: list[str] = []
    supervisor = Supervisor(
        config,
        pool,
        wire,
        dispatcher,
        fatal.append,
        spawner=spawner,
        clock=clock,
        sleep=sleep or clock.sleep,
        oom=oom or OomCounter(events=Path("/nonexistent")),
    )
    gw = Gateway(config, pool, wire, dispatcher, supervisor, spawner, clock, fatal)
    supervisor.on_death = gw.deaths.append
    return gw


@on_loop
async def test_a_worker_death_settles_its_requests_at_once_and_refills_the_slot() -> None:
    gw = gateway(1)
    await gw.start()
    worker = gw.pool.workers[0]
    gw.ready(worker)
    first_uid = worker.uid
    pending = gw.dispatcher.enqueue("json", b"{}")

    gw.spawner.of(worker).exit(-9)
    # A worker that had been ready is replaced at once, as a new generation.
    await gw.spawned(2)  # a replacement
    assert worker.uid != first_uid and worker.state is State.STARTING
    assert worker.restarts == 1 and worker.exit_code == -9
    # A SIGKILL the supervisor did not send: from outside (the OOM killer, say).
    assert gw.deaths == ["killed_outside"]
    assert worker.last_death is not None and worker.last_death.cause == "killed_outside"
    # Its request waits for the replacement (a retry), which answers it.
    assert not pending.future.done() and pending.queued
    gw.ready(worker)
    assert gw.wire.requests(worker) == [pending.id]
    gw.answer(worker, pending.id)
    assert (await gw.dispatcher.result(pending)).body == b"{}"


@on_loop
async def test_a_silent_worker_is_declared_dead_after_its_missed_heartbeats_and_killed() -> None:
    gw = gateway(2, heartbeat_liveness=3)
    await gw.start()
    talker, silent = gw.pool.workers
    gw.ready(talker, capacity=2)
    gw.ready(silent, capacity=2)
    on_talker = gw.dispatcher.enqueue("json", b"{}")
    on_silent = gw.dispatcher.enqueue("json", b"{}")
    assert gw.wire.requests(silent) == [on_silent.id]
    silent_process = gw.spawner.of(silent)

    for _ in range(3):  # three heartbeats missed: not yet
        await gw.clock.advance(1.0)
        gw.say(talker, protocol.HEARTBEAT)
    assert silent.ready and not silent_process.killed
    assert len(gw.wire.controls(silent, protocol.BEAT)) >= 3  # it was beaten to all along

    await gw.clock.advance(1.0)
    assert silent_process.killed
    assert silent.last_error == "worker 1 sent no heartbeat for 4.0s (hung); killed"
    # Its request went at once to the worker that still answers.
    assert gw.wire.requests(talker) == [on_talker.id, on_silent.id]
    assert talker.ready and gw.deaths == ["heartbeat"]  # counted once, not again when reaped
    await eventually(lambda: silent.state is State.RESTARTING, "the silent worker to be reaped")


@on_loop
async def test_after_serving_a_crash_loop_backs_off_longer_each_time_then_ends_in_failed() -> None:
    gw = gateway(1)
    worker = gw.pool.workers[0]
    await gw.supervisor.spawn(worker)  # the slot alone: no heartbeat loop sleeping
    gw.ready(worker)
    gw.spawner.of(worker).exit(-9)  # a worker that served dies: replaced at once
    await gw.spawned(2)  # an immediate replacement

    delays: list[float] = []
    for failure in range(1, MAX_BOOT_FAILURES):
        gw.spawner.of(worker).exit(protocol.EXIT_LOAD_FAILED)
        await eventually(lambda: gw.clock.sleeping, f"backoff after failure {failure}")
        (delay,) = gw.clock.sleeping
        delays.append(delay)
        await gw.clock.advance(delay - 0.01)
        assert len(gw.spawner.processes) == 1 + failure  # not restarted before the delay
        await gw.clock.advance(0.01)
        await gw.spawned(2 + failure)

    expected = [min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**n) for n in range(MAX_BOOT_FAILURES - 1)]
    assert delays == expected and delays == sorted(set(delays))

    gw.say(worker, protocol.ERROR, message="ModelLoadError: out of disk")
    gw.spawner.of(worker).exit(protocol.EXIT_LOAD_FAILED)
    await eventually(lambda: worker.state is State.FAILED, "the slot to be given up")
    assert gw.clock.sleeping == [] and len(gw.spawner.processes) == 1 + MAX_BOOT_FAILURES
    assert worker.last_error == "ModelLoadError: out of disk"
    # The pool once served, so the server keeps running (degraded), not stopped.
    assert gw.fatal == []


@on_loop
async def test_a_model_that_never_loaded_fails_the_pool_without_restarting() -> None:
    gw = gateway(2)
    await gw.start()
    first, second = gw.pool.workers
    gw.spawner.of(first).stderr_tail.append("FileNotFoundError: model.pt")
    gw.spawner.of(first).exit(protocol.EXIT_LOAD_FAILED)
    await eventually(lambda: first.state is State.FAILED, "worker 0 to fail")
    assert gw.fatal == []  # worker 1 may still load

    gw.spawner.of(second).exit(protocol.EXIT_LOAD_FAILED)
    await eventually(lambda: gw.fatal, "the server to give up")
    assert gw.fatal == ["worker 0 exited with code 3: FileNotFoundError: model.pt"]
    assert second.state is State.FAILED and len(gw.spawner.processes) == 2
    assert gw.deaths == ["load_failed", "load_failed"]


@on_loop
async def test_recycling_hands_over_to_a_ready_successor_before_draining_the_old_worker() -> None:
    gw = gateway(1, max_requests_per_worker=2)
    await gw.start()
    old = gw.pool.workers[0]
    gw.ready(old)
    for _ in range(2):
        pending = gw.dispatcher.enqueue("json", b"{}")
        gw.answer(old, pending.id)
    assert old.recycling  # wanted; the reconcile step starts the successor
    await gw.spawned(2)
    assert [w.role for w in gw.pool.handovers] == [Role.SUCCESSOR]
    (successor,) = gw.pool.handovers

    # Until the successor is ready, the old worker keeps serving.
    held = gw.dispatcher.enqueue("json", b"{}")
    assert gw.wire.requests(old)[-1] == held.id
    gw.say(successor, protocol.HELLO)
    gw.say(successor, protocol.LOADING)
    assert gw.pool.workers[0] is old and gw.wire.controls(old, protocol.STOP) == []

    gw.ready(successor)
    await eventually(lambda: gw.pool.workers[0] is successor, "the successor to take over")
    assert successor.role is Role.CURRENT and old.role is Role.RETIRING
    recycled = "recycled: served 2 requests (limit 2)"
    assert gw.wire.controls(old, protocol.STOP) == [{"t": protocol.STOP, "reason": recycled}]
    after = gw.dispatcher.enqueue("json", b"{}")
    assert gw.wire.requests(successor) == [after.id]

    gw.answer(old, held.id)  # the old worker finishes what it held
    assert (await gw.dispatcher.result(held)).body == b"{}"
    gw.spawner.of(old).exit(0)
    await eventually(lambda: old.state is State.STOPPED, "the old worker to be reaped")
    assert gw.pool.by_uid(old.uid) is None and old not in gw.pool.handovers
    assert gw.deaths == [] and successor.ready


@on_loop
async def test_a_successor_that_dies_keeps_the_old_worker_and_retries_later() -> None:
    gw = gateway(1, max_requests_per_worker=1)
    (old,) = await gw.serving()
    gw.serve_one(old)
    await gw.spawned(2)
    (successor,) = gw.pool.handovers

    gw.spawner.of(successor).exit(protocol.EXIT_LOAD_FAILED)
    await eventually(lambda: not gw.pool.handovers, "the successor to be forgotten")
    assert gw.pool.workers[0] is old and old.ready and not old.recycling
    assert gw.deaths == ["load_failed"]

    # Each heartbeat checks the limits again, but not until RECYCLE_RETRY_S have passed.
    for _ in range(round(RECYCLE_RETRY_S) - 1):
        await gw.clock.advance(1.0)
        gw.say(old, protocol.HEARTBEAT)
    assert not gw.pool.handovers
    await gw.clock.advance(1.0)
    gw.say(old, protocol.HEARTBEAT)
    await gw.spawned(3)
    assert [w.role for w in gw.pool.handovers] == [Role.SUCCESSOR]


# --- regressions (issue #10, item 6) ------------------------------------------------


@on_loop
async def test_scaling_down_a_slot_waiting_out_its_backoff_spawns_nothing_untracked() -> None:
    gw = gateway(2)
    await gw.start()
    kept, doomed = gw.pool.workers
    gw.ready(kept)
    gw.spawner.of(doomed).exit(1)  # dies booting: its replacement waits out a backoff
    await eventually(lambda: BACKOFF_BASE_S in gw.clock.sleeping, "the backoff to start")

    await gw.supervisor.scale_to(1)
    await gw.clock.advance(BACKOFF_MAX_S)
    # Nothing was spawned for the removed slot: no worker runs that no record tracks.
    assert len(gw.spawner.processes) == 2
    assert gw.pool.workers == [kept] and doomed.state is State.STOPPED


@on_loop
async def test_a_ready_worker_that_goes_silent_is_not_counted_as_a_boot_failure() -> None:
    gw = gateway(1, heartbeat_liveness=3)
    await gw.start()
    worker = gw.pool.workers[0]
    gw.ready(worker)
    process = gw.spawner.of(worker)
    while not process.killed:
        await gw.clock.advance(1.0)
    # Replaced at once, without a backoff (the clock does not move from here on).
    await gw.spawned(2)
    assert worker.boot_failures == 0 and worker.restarts == 1
    assert gw.deaths == ["heartbeat"]


@on_loop
async def test_a_successor_declared_lost_is_counted_as_one_death() -> None:
    gw = gateway(1, max_requests_per_worker=1)
    (old,) = await gw.serving()
    gw.serve_one(old)
    await gw.spawned(2)
    (successor,) = gw.pool.handovers
    process = gw.spawner.of(successor)
    while not process.killed:  # the successor never says hello; the old one beats on
        await gw.clock.advance(1.0)
        gw.say(old, protocol.HEARTBEAT)
    await eventually(lambda: successor not in gw.pool.handovers, "the successor to be reaped")
    assert gw.deaths == ["hello_timeout"]
    assert gw.pool.workers[0] is old and old.ready


@on_loop
async def test_a_backoff_timer_that_fires_early_still_refills_the_slot() -> None:
    # uvloop's timers run on a cached loop time, so a sleep can end a few
    # milliseconds before the monotonic clock says the backoff is over.
    early = 0.01
    clock_of: list[Any] = []

    async def sleep(delay: float) -> None:
        await clock_of[0].sleep(delay - early if delay > 2 * early else delay)

    gw = gateway(1, sleep=sleep)
    clock_of.append(gw.clock)
    await gw.start()
    worker = gw.pool.workers[0]
    gw.spawner.of(worker).exit(1)  # dies booting: a backoff of BACKOFF_BASE_S
    shortened = BACKOFF_BASE_S - early
    await eventually(lambda: shortened in gw.clock.sleeping, "the backoff to start")
    await gw.clock.advance(shortened)  # the timer fires, a little early
    # Not due yet: the reconcile step looks again when it will be.
    await eventually(lambda: any(d < 2 * early for d in gw.clock.sleeping), "a second look")
    await gw.clock.advance(2 * early)
    await gw.spawned(2)
    assert worker.state is State.STARTING and worker.boot_failures == 1


@on_loop
async def test_requests_wait_for_a_booting_worker_and_stop_waiting_when_it_crash_loops() -> None:
    gw = gateway(1)
    await gw.start()
    worker = gw.pool.workers[0]
    pending = gw.dispatcher.enqueue("json", b"{}")  # nothing ready yet: it waits
    assert pending.queued

    gw.spawner.of(worker).exit(1)  # dies booting once: restarted after a backoff
    await eventually(lambda: BACKOFF_BASE_S in gw.clock.sleeping, "the backoff to start")
    assert worker.boot_failures == 1 and not pending.future.done()

    await gw.clock.advance(BACKOFF_BASE_S)
    await gw.spawned(2)
    gw.spawner.of(worker).exit(1)  # and again: a crash loop, so nothing waits for it
    await eventually(lambda: pending.future.done(), "the waiting request to be answered")
    with pytest.raises(Unavailable, match="crash loop"):
        await gw.dispatcher.result(pending)
    with pytest.raises(Unavailable, match="crash loop"):
        gw.dispatcher.enqueue("json", b"{}")


@on_loop
async def test_a_stopping_gateway_answers_the_requests_that_waited_for_a_booting_worker() -> None:
    gw = gateway(1)
    await gw.start()
    pending = gw.dispatcher.enqueue("json", b"{}")
    gw.supervisor.begin_drain()
    assert pending.future.done()
    with pytest.raises(Unavailable, match="shutting down"):
        await gw.dispatcher.result(pending)


@on_loop
async def test_sigkills_from_outside_while_booting_are_no_crash_loop() -> None:
    gw = gateway(1)
    await gw.start()
    worker = gw.pool.workers[0]
    pending = gw.dispatcher.enqueue("json", b"{}")
    for n in (1, 2):  # killed while it boots, twice: a chaos monkey, not the model
        gw.spawner.of(worker).exit(-signal.SIGKILL)
        delay = BACKOFF_BASE_S * 2 ** (n - 1)
        # The heartbeat loop sleeps too (1 s): the backoff is one more sleep.
        sleeps = 2 if delay == gw.settings.heartbeat_s else 1
        await eventually(
            lambda: gw.clock.sleeping.count(delay) >= sleeps,  # noqa: B023
            "the backoff to start",
        )
        await gw.clock.advance(delay)
        await gw.spawned(1 + n)
    # Backed off as any boot death, but the request still waits for the worker.
    assert worker.crash_boots == 0 and not pending.future.done()
    gw.ready(worker)
    gw.answer(worker, pending.id)
    assert (await gw.dispatcher.result(pending)).body == b"{}"
