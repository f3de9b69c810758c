"""The dispatcher's rules, against an in-memory wire: no workers, no sockets, no waiting.

Credit, least-outstanding choice, the bounded queue, retries after a worker is
lost, deadlines, callers that leave, and stray replies. The same paths through
real processes are in test_faults.py and test_chaos.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.api.http import run_request
from gateway.pool.dispatch import Dispatcher
from gateway.pool.pending import Reply
from gateway.pool.placement import Placement
from gateway.pool.workers import Pool, State, WorkerRecord
from shared import protocol
from shared.errors import ClientClosed, DeadlineExceeded, QueueFull, Unavailable
from tests.fakes import FakeTransport, eventually, on_loop

pytestmark = pytest.mark.fast


def ready_pool(size: int, capacity: int) -> Pool:
    pool = Pool([Placement(slot, "cpu", None, (slot,)) for slot in range(size)])
    for worker in pool.workers:
        worker.state = State.READY
        worker.capacity = capacity
    return pool


def dispatcher_for(
    pool: Pool,
    queue_size: int = 8,
    timeout_s: float = 30.0,
    on_unreachable: Callable[[WorkerRecord], None] | None = None,
) -> tuple[Dispatcher, FakeTransport]:
    wire = FakeTransport()
    return Dispatcher(pool, wire, queue_size, timeout_s, on_unreachable), wire


def reply(dispatcher: Dispatcher, worker: WorkerRecord, request_id: object) -> None:
    header = {"t": protocol.REPLY, "id": request_id, "code": protocol.OK, "fmt": "json"}
    dispatcher.on_reply(worker, header, [b'{"ok": true}'])


def lose(dispatcher: Dispatcher, worker: WorkerRecord, how: str) -> None:
    """What the supervisor does when a worker dies: out of rotation, then settle."""
    worker.state = State.RESTARTING
    dispatcher.worker_lost(worker, how)


@on_loop
async def test_a_worker_never_holds_more_than_its_capacity() -> None:
    pool = ready_pool(1, capacity=2)
    dispatcher, wire = dispatcher_for(pool)
    worker = pool.workers[0]
    first, second, third = [dispatcher.enqueue("json", b"{}") for _ in range(3)]
    assert wire.requests(worker) == [first.id, second.id]
    assert third.queued and dispatcher.queued == 1

    reply(dispatcher, worker, first.id)
    assert (await dispatcher.result(first)).body == b'{"ok": true}'
    # The reply freed one credit, and the queued request took it at once.
    assert wire.requests(worker) == [first.id, second.id, third.id]
    assert not third.queued
    assert len(worker.inflight) == 2


@on_loop
async def test_the_worker_with_the_least_outstanding_work_is_picked() -> None:
    pool = ready_pool(2, capacity=4)
    dispatcher, wire = dispatcher_for(pool)
    a, b = pool.workers
    p1, p2, p3 = [dispatcher.enqueue("json", b"{}") for _ in range(3)]
    # 0-0 goes to a, 1-0 to b, 1-1 (a tie) to the first.
    assert (wire.requests(a), wire.requests(b)) == ([p1.id, p3.id], [p2.id])
    reply(dispatcher, a, p1.id)
    reply(dispatcher, a, p3.id)
    p4 = dispatcher.enqueue("json", b"{}")
    assert wire.requests(a)[-1] == p4.id  # a holds 0, b holds 1
    p5 = dispatcher.enqueue("json", b"{}")
    p6 = dispatcher.enqueue("json", b"{}")
    assert wire.requests(b)[1:] == [p6.id] and wire.requests(a)[-1] == p5.id


@on_loop
async def test_a_full_queue_answers_503_at_once() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, wire = dispatcher_for(pool, queue_size=1)
    sent = dispatcher.enqueue("json", b"{}")
    queued = dispatcher.enqueue("json", b"{}")
    with pytest.raises(QueueFull, match="queue is full"):
        dispatcher.enqueue("json", b"{}")
    assert dispatcher.queued == 1 and dispatcher.outstanding == 2
    assert wire.requests(pool.workers[0]) == [sent.id]
    assert queued.queued


@on_loop
async def test_a_lost_workers_request_is_retried_at_most_twice_elsewhere() -> None:
    pool = ready_pool(4, capacity=4)
    dispatcher, wire = dispatcher_for(pool)
    a, b, c, d = pool.workers
    pending = dispatcher.enqueue("json", b"{}")
    assert wire.requests(a) == [pending.id]

    lose(dispatcher, a, "exited with code 1")
    assert wire.requests(b) == [pending.id]  # retried at once, on the least busy other
    lose(dispatcher, b, "killed by SIGKILL")  # killed with a: one more try
    assert wire.requests(c) == [pending.id]
    assert not pending.future.done()

    lose(dispatcher, c, "killed by SIGSEGV")
    # Its retries are spent: answered, although d is ready and idle.
    assert pending.future.done() and wire.requests(d) == []
    with pytest.raises(Unavailable, match="worker 2 killed by SIGSEGV before answering"):
        await dispatcher.result(pending)


@on_loop
async def test_a_lost_worker_with_no_other_and_none_coming_settles_everything_with_503() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, _ = dispatcher_for(pool)
    worker = pool.workers[0]
    held = dispatcher.enqueue("json", b"{}")
    queued = dispatcher.enqueue("json", b"{}")

    worker.state = State.FAILED  # not replaced: nothing is coming
    dispatcher.worker_lost(worker, "exited with code 1")
    # Settled at once, not at their deadlines.
    assert held.future.done() and queued.future.done()
    with pytest.raises(Unavailable, match="worker 0 exited with code 1 before answering"):
        await dispatcher.result(held)
    with pytest.raises(Unavailable, match="no worker is ready"):
        await dispatcher.result(queued)
    assert dispatcher.queued == 0 and dispatcher.outstanding == 0
    assert worker.inflight == {}


@on_loop
async def test_requests_of_a_lost_worker_wait_for_its_replacement() -> None:
    pool = ready_pool(1, capacity=2)
    dispatcher, wire = dispatcher_for(pool)
    worker = pool.workers[0]
    held = dispatcher.enqueue("json", b"{}")
    lose(dispatcher, worker, "killed by SIGKILL")  # RESTARTING: a replacement is due
    arrived = dispatcher.enqueue("json", b"{}")  # not refused: it waits too
    assert not held.future.done() and not arrived.future.done()
    assert dispatcher.queued == 2

    worker.state = State.READY  # the replacement is ready (the supervisor pumps)
    dispatcher.pump()
    assert wire.requests(worker)[-2:] == [held.id, arrived.id]
    reply(dispatcher, worker, held.id)
    reply(dispatcher, worker, arrived.id)
    assert (await dispatcher.result(held)).body == (await dispatcher.result(arrived)).body


@on_loop
async def test_a_request_waits_for_a_booting_worker_until_its_deadline() -> None:
    pool = Pool([Placement(0, "cpu", None, (0,))])
    pool.workers[0].state = State.LOADING
    dispatcher, _ = dispatcher_for(pool, timeout_s=0.05)
    pending = dispatcher.enqueue("json", b"{}")
    assert pending.queued
    with pytest.raises(DeadlineExceeded):
        await dispatcher.result(pending)


@on_loop
async def test_a_crash_loop_a_drain_or_a_full_queue_answer_503_at_once() -> None:
    pool = Pool([Placement(0, "cpu", None, (0,))])
    worker = pool.workers[0]
    worker.state = State.RESTARTING
    worker.crash_boots = 2  # died booting twice in a row
    worker.last_error = "worker 0 exited with code 1: ImportError: no module named x"
    dispatcher, _ = dispatcher_for(pool, queue_size=1)
    with pytest.raises(Unavailable, match=r"crash loop.*ImportError"):
        dispatcher.enqueue("json", b"{}")

    worker.crash_boots = 1
    waiting = dispatcher.enqueue("json", b"{}")
    with pytest.raises(Unavailable, match="queue is full"):
        dispatcher.enqueue("json", b"{}")
    worker.crash_boots = 2  # it died booting again
    dispatcher.give_up_waiting("worker 0 exited with code 1")
    with pytest.raises(Unavailable, match="crash loop"):
        await dispatcher.result(waiting)

    worker.crash_boots = 0
    pool.draining = True
    with pytest.raises(Unavailable, match="shutting down"):
        dispatcher.enqueue("json", b"{}")


@on_loop
async def test_a_deadline_answers_504_and_drops_the_queued_request() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, wire = dispatcher_for(pool, timeout_s=30.0)
    worker = pool.workers[0]
    running = dispatcher.enqueue("json", b"{}")
    late = dispatcher.enqueue("json", b"{}", timeout_s=0.02)

    with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.02s"):
        await dispatcher.result(late)
    assert dispatcher.queued == 0 and not late.queued

    reply(dispatcher, worker, running.id)
    await dispatcher.result(running)
    assert wire.requests(worker) == [running.id]  # the expired one was never sent
    assert dispatcher.outstanding == 0


@on_loop
async def test_a_client_that_leaves_takes_its_request_out_of_the_queue() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, wire = dispatcher_for(pool)
    worker = pool.workers[0]
    running = dispatcher.enqueue("json", b"{}")
    queued = dispatcher.enqueue("json", b"{}")
    waiter = asyncio.ensure_future(dispatcher.result(queued))
    await asyncio.sleep(0)  # the caller is now waiting on its reply

    waiter.cancel()  # what the HTTP server does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert dispatcher.queued == 0 and dispatcher.outstanding == 1

    reply(dispatcher, worker, running.id)
    assert wire.requests(worker) == [running.id]


@on_loop
async def test_replies_for_unknown_ids_are_ignored() -> None:
    pool = ready_pool(2, capacity=2)
    dispatcher, _ = dispatcher_for(pool)
    a, b = pool.workers
    pending = dispatcher.enqueue("json", b"{}")
    for stray in (pending.id + 1000, "not an id", None):
        reply(dispatcher, a, stray)
    reply(dispatcher, b, pending.id)  # the right id from the wrong worker
    assert not pending.future.done()
    assert a.requests_served == b.requests_served == 0
    assert list(a.inflight) == [pending.id]

    reply(dispatcher, a, pending.id)
    reply(dispatcher, a, pending.id)  # a duplicate
    assert (await dispatcher.result(pending)).fmt == "json"
    assert a.requests_served == 1


@on_loop
async def test_an_unreachable_worker_is_reported_and_its_request_goes_elsewhere() -> None:
    pool = ready_pool(2, capacity=1)
    reported: list[WorkerRecord] = []

    def unreachable(worker: WorkerRecord) -> None:
        reported.append(worker)
        lose(dispatcher, worker, "became unreachable")

    dispatcher, wire = dispatcher_for(pool, on_unreachable=unreachable)
    a, b = pool.workers
    wire.gone.add(a.data_identity)
    pending = dispatcher.enqueue("json", b"{}")
    assert reported == [a]
    assert wire.requests(b) == [pending.id]


# --- the deadline timer: one per request, settled once, never left behind ----------


@on_loop
async def test_past_its_deadline_a_request_fails_once_and_its_late_reply_is_dropped() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, _ = dispatcher_for(pool)
    worker = pool.workers[0]
    pending = dispatcher.enqueue("json", b"{}", timeout_s=0.02)
    settled: list[asyncio.Future[Reply]] = []
    pending.future.add_done_callback(settled.append)

    with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.02s"):
        await dispatcher.result(pending)
    reply(dispatcher, worker, pending.id)  # the worker answers after all
    await asyncio.sleep(0)  # let any second settlement's callbacks run

    assert len(settled) == 1 and isinstance(pending.future.exception(), DeadlineExceeded)
    assert worker.inflight == {} and dispatcher.outstanding == 0
    assert pending.timer is None


@on_loop
async def test_a_reply_before_the_deadline_wins_and_cancels_the_timer() -> None:
    pool = ready_pool(1, capacity=2)
    dispatcher, _ = dispatcher_for(pool)
    worker = pool.workers[0]
    early, racing = (dispatcher.enqueue("json", b"{}", timeout_s=0.05) for _ in range(2))
    timer = early.timer
    assert timer is not None and not timer.cancelled()

    reply(dispatcher, worker, early.id)
    assert (await dispatcher.result(early)).body == b'{"ok": true}'
    assert timer.cancelled() and early.timer is None

    # The deadline reached in the same turn as the reply, after it: the reply stands.
    reply(dispatcher, worker, racing.id)
    dispatcher._expire(racing)
    assert (await dispatcher.result(racing)).body == b'{"ok": true}'
    assert dispatcher.outstanding == 0


@on_loop
async def test_no_timer_outlives_its_request() -> None:
    pool = ready_pool(2, capacity=2)
    dispatcher, _ = dispatcher_for(pool, queue_size=8)
    requests = [dispatcher.enqueue("json", b"{}") for _ in range(6)]  # 4 sent, 2 queued
    timers = [p.timer for p in requests]
    waiters = [asyncio.ensure_future(dispatcher.result(p)) for p in requests]
    await asyncio.sleep(0)
    waiters[-1].cancel()  # a caller that leaves while queued
    for _ in range(3):  # each reply frees credit for a queued one
        for worker in pool.workers:
            for request_id in list(worker.inflight):
                reply(dispatcher, worker, request_id)
        await asyncio.sleep(0)
    await asyncio.gather(*waiters, return_exceptions=True)

    assert all(t is not None and t.cancelled() for t in timers)
    assert dispatcher.outstanding == 0 and dispatcher.queued == 0


# --- run_request: a queued request and its client -------------------------------------


class FakeClient:
    """An ASGI ``receive`` whose body was read; ``leave()`` disconnects."""

    def __init__(self) -> None:
        self._left = asyncio.Event()

    def leave(self) -> None:
        self._left.set()

    async def receive(self) -> dict[str, object]:
        await self._left.wait()
        return {"type": "http.disconnect"}


@on_loop
async def test_a_queued_request_whose_client_leaves_is_answered_client_closed() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, wire = dispatcher_for(pool)
    worker = pool.workers[0]
    running = dispatcher.enqueue("json", b"{}")
    client = FakeClient()
    call = asyncio.ensure_future(run_request(client.receive, dispatcher, "json", b"{}", None))
    await eventually(lambda: dispatcher.queued == 1, "the request is queued")

    client.leave()
    with pytest.raises(ClientClosed):
        await call
    assert dispatcher.queued == 0 and dispatcher.outstanding == 1
    reply(dispatcher, worker, running.id)
    assert wire.requests(worker) == [running.id]  # the one that left never ran


@on_loop
async def test_a_queued_request_that_gets_its_answer_stops_watching_its_client() -> None:
    pool = ready_pool(1, capacity=1)
    dispatcher, _ = dispatcher_for(pool)
    worker = pool.workers[0]
    running = dispatcher.enqueue("json", b"{}")
    client = FakeClient()
    call = asyncio.ensure_future(run_request(client.receive, dispatcher, "json", b"{}", None))
    await eventually(lambda: dispatcher.queued == 1, "the request is queued")

    reply(dispatcher, worker, running.id)  # frees the credit: the queued one is sent
    (queued_id,) = worker.inflight
    reply(dispatcher, worker, queued_id)
    assert (await call).fmt == "json"
    only_this = {asyncio.current_task()}
    await eventually(lambda: asyncio.all_tasks() == only_this, "no task watches the client")
    await dispatcher.result(running)
    assert dispatcher.outstanding == 0
