"""Recycling and reload through the reconcile step, with fakes (no process, no real time).

Recycling and reload only record what they want; the reconcile step starts
successors, hands slots over once they are ready, retires the old workers and
drops successors that died. The same paths with real workers are in
test_faults.py (recycling) and test_multimodel.py (reload).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.pool.workers import Role, State
from shared import protocol
from shared.errors import ModelLoadError
from tests.fakes import eventually, on_loop
from tests.test_supervisor_fast import Gateway, gateway

pytestmark = pytest.mark.fast


def untracked(gw: Gateway) -> list[str]:
    """Live processes that no record of the pool holds: nobody beats to them or stops them."""
    tracked = {w.uid for w in gw.pool.all_records() if gw.pool.by_uid(w.uid) is w}
    return [p.uid for p in gw.spawner.processes if p.is_alive() and p.uid not in tracked]


@on_loop
async def test_a_recycle_is_one_successor_however_often_reconcile_runs() -> None:
    gw = gateway(1, max_requests_per_worker=1)
    (old,) = await gw.serving()
    gw.serve_one(old)
    assert old.recycling  # wanted, and nothing more yet
    for _ in range(3):
        await gw.supervisor.reconcile()
    await gw.spawned(2)
    assert len(gw.spawner.processes) == 2
    assert [w.role for w in gw.pool.handovers] == [Role.SUCCESSOR]

    (successor,) = gw.pool.handovers
    gw.ready(successor)
    await gw.supervisor.reconcile()
    assert gw.pool.workers == [successor] and old.role is Role.RETIRING
    for _ in range(3):  # the new worker has served nothing: no successor for it
        await gw.supervisor.reconcile()
    assert len(gw.spawner.processes) == 2 and gw.pool.handovers == [old]


@on_loop
async def test_a_reload_hands_over_only_once_every_successor_is_ready() -> None:
    gw = gateway(2)
    olds = await gw.serving()
    new = dataclasses.replace(gw.settings, max_batch_size=7)
    reload = asyncio.ensure_future(gw.supervisor.reload(new))
    await gw.spawned(4)
    first, second = gw.pool.handovers
    assert all("--max-batch-size=7" in gw.spawner.of(s).argv for s in (first, second))

    gw.ready(first)
    for _ in range(3):
        await gw.supervisor.reconcile()
    # One generation of settings at a time: nothing is handed over yet.
    assert gw.pool.workers == olds and not reload.done()
    assert gw.supervisor.settings.max_batch_size != 7

    gw.ready(second)
    await eventually(reload.done, "the reload to finish")
    await reload
    assert gw.pool.workers == [first, second] and gw.supervisor.settings.max_batch_size == 7
    assert all(
        gw.wire.controls(o, protocol.STOP) == [{"t": "stop", "reason": "replaced by a reload"}]
        for o in olds
    )


@on_loop
async def test_a_reload_whose_successor_fails_keeps_the_old_workers_and_says_why() -> None:
    gw = gateway(2)
    olds = await gw.serving()
    before = gw.supervisor.settings
    reload = asyncio.ensure_future(
        gw.supervisor.reload(dataclasses.replace(before, max_batch_size=7))
    )
    await gw.spawned(4)
    loaded, broken = gw.pool.handovers
    gw.ready(loaded)
    gw.spawner.of(broken).stderr_tail.append("FileNotFoundError: mlp.pt")
    gw.spawner.of(broken).exit(protocol.EXIT_LOAD_FAILED)

    await eventually(reload.done, "the reload to fail")
    with pytest.raises(ModelLoadError, match=r"^worker 1 exited with code 3: FileNotFoundError"):
        await reload
    assert gw.deaths == ["load_failed"]
    # The successor that had loaded is stopped; the old workers serve on, as they were.
    assert gw.wire.controls(loaded, protocol.STOP) == [{"t": "stop", "reason": "reload abandoned"}]
    await eventually(lambda: not gw.pool.handovers, "the successors to be let go of")
    assert not gw.spawner.of(loaded).is_alive() and untracked(gw) == []
    assert gw.pool.workers == olds and all(w.ready for w in olds)
    assert gw.supervisor.settings is before
    pending = gw.dispatcher.enqueue("json", b"{}")
    assert pending.id in gw.wire.requests(olds[0]) + gw.wire.requests(olds[1])

    # Nothing is left under way: the model can be reloaded again.
    again = asyncio.ensure_future(gw.supervisor.reload())
    await gw.spawned(6)
    again.cancel()


@on_loop
async def test_a_reload_whose_successor_cannot_start_fails_with_why() -> None:
    gw = gateway(2)
    olds = await gw.serving()
    gw.spawner.cannot_start[3] = OSError(24, "Too many open files")  # the second successor
    reload = asyncio.ensure_future(gw.supervisor.reload())
    await eventually(reload.done, "the reload to fail")
    with pytest.raises(ModelLoadError, match=r"worker 1 could not be started: .*open files"):
        await reload
    await eventually(lambda: not gw.pool.handovers, "the started successor to be let go of")
    assert gw.pool.workers == olds and all(w.ready for w in olds) and untracked(gw) == []


@on_loop
async def test_a_reload_successor_declared_lost_is_one_death_and_fails_the_reload() -> None:
    gw = gateway(1)
    await gw.start()
    old = gw.pool.workers[0]
    gw.ready(old)
    reload = asyncio.ensure_future(gw.supervisor.reload())
    await gw.spawned(2)
    (successor,) = gw.pool.handovers
    process = gw.spawner.of(successor)
    while not process.killed:  # the successor never says hello; the old one beats on
        await gw.clock.advance(1.0)
        gw.say(old, protocol.HEARTBEAT)

    await eventually(reload.done, "the reload to fail")
    with pytest.raises(ModelLoadError, match="did not say hello within"):
        await reload
    assert gw.deaths == ["hello_timeout"]
    assert gw.pool.workers == [old] and old.ready and not gw.pool.handovers


@on_loop
async def test_scaling_down_during_a_recycle_leaves_no_untracked_worker() -> None:
    gw = gateway(3, max_requests_per_worker=1)
    await gw.start()
    kept, marked, booting = gw.pool.workers
    for worker in gw.pool.workers:
        gw.ready(worker)

    # A slot whose successor is booting is scaled away: the successor is stopped too.
    booting.requests_served = 1
    gw.supervisor.check_recycle(booting)
    await gw.spawned(4)
    (successor,) = gw.pool.handovers
    await gw.supervisor.scale_to(2)
    assert gw.wire.controls(successor, protocol.STOP) == [{"t": "stop", "reason": "scaled down"}]
    gw.say(successor, protocol.READY, capacity=1)  # too late: it takes no slot
    await gw.supervisor.reconcile()
    assert gw.pool.workers == [kept, marked] and successor.role is Role.RETIRING
    await eventually(lambda: not gw.spawner.of(successor).is_alive(), "the successor to stop")

    # A slot that wants a successor is scaled away before one starts: none starts.
    marked.requests_served = 1
    gw.supervisor.check_recycle(marked)
    assert marked.recycling
    await gw.supervisor.scale_to(1)
    for _ in range(3):  # with turns of the loop between, for anything started meanwhile
        await gw.supervisor.reconcile()
        await asyncio.sleep(0)
    assert len(gw.spawner.processes) == 4 and untracked(gw) == []

    for retiring in list(gw.pool.handovers):
        assert retiring.role is Role.RETIRING and gw.wire.controls(retiring, protocol.STOP)
        gw.spawner.of(retiring).exit(0)
    await eventually(lambda: not gw.pool.handovers, "the retired workers to be reaped")
    assert gw.pool.workers == [kept] and kept.state is State.READY
    assert [p.uid for p in gw.spawner.processes if p.is_alive()] == [kept.uid]
    assert gw.deaths == []
