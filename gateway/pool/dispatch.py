"""Hands requests to workers and gives each caller its reply, an error, or a 504.

A request goes to the ready worker with the least outstanding work that still
has credit (workers advertise how many requests they want outstanding, enough
to fill a batch). When none has credit, it waits in a bounded FIFO queue; when
the queue is full the caller gets 503 at once. Every request has a deadline.

A request also waits in that queue when no worker is ready but one is coming
(booting, or dead with its replacement due; see :meth:`Pool.coming`): it is
sent when a worker becomes ready, or answered 504 at its deadline. It is
answered 503 at once only when nothing is coming: a crash loop, a failed
model, a stopping gateway; and waiting requests get that 503 as soon as the
last coming worker stops coming (:meth:`Dispatcher.give_up_waiting`).

When a worker dies or is declared dead, every request it held is settled at
once: retried on another worker, ready or coming (inference is idempotent;
at most MAX_ATTEMPTS tries), or answered 503 saying how the worker died. Nothing waits for a
timeout that no worker can beat.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from gateway.pool.pending import Pending, Reply
from gateway.pool.transport import Transport
from gateway.pool.workers import Pool, WorkerRecord
from shared import protocol
from shared.errors import (
    SHUTTING_DOWN,
    DeadlineExceeded,
    QueueFull,
    TorchpoolError,
    Unavailable,
    error_from_code,
)

log = logging.getLogger("torchpool.dispatch")

# The first try and up to two retries after worker deaths: a request caught
# between two workers killed together (a retry sent to one that was already
# dying) still gets its answer, while a request that kills every worker it
# reaches (a poison request) is answered 503 after the third.
MAX_ATTEMPTS = 3

# REPLY header keys that are not passed on in Reply.fields.
_REPLY_KEYS = frozenset({"t", "id", "code", "message", "details", "fmt"})


class Dispatcher:
    def __init__(
        self,
        pool: Pool,
        transport: Transport,
        queue_size: int,
        timeout_s: float,
        on_unreachable: Callable[[WorkerRecord], None] | None = None,
    ) -> None:
        self._pool = pool
        self._transport = transport
        self._queue_size = queue_size
        self._timeout_s = timeout_s
        self._on_unreachable = on_unreachable
        self._queue: collections.deque[Pending] = collections.deque()
        self._ids = itertools.count(1)
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pack = protocol.packer()  # the event loop's thread only
        # Observer for metrics: called with the seconds a request waited in the
        # gateway (queued or not) before its first send to a worker.
        self.on_first_send: Callable[[float], None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def enqueue(
        self,
        fmt: str,
        body: bytes,
        timeout_s: float | None = None,
        fields: protocol.RequestExtras | None = None,
        kind: type[Pending] = Pending,
    ) -> Pending:
        """Hand a request to a worker, or queue it; 503 at once when neither can be done.

        ``timeout_s`` can only shorten the server's deadline (--timeout-s);
        ``fields`` adds fields to the REQUEST header; ``kind`` is the Pending
        class to make (a stream's, see :mod:`gateway.pool.streams`).
        """
        if self._pool.draining:
            raise Unavailable(SHUTTING_DOWN)
        worker = self._pool.pick()  # one with credit is ready: no need to list the ready ones
        if worker is None and not self._pool.ready_workers() and not self._pool.coming():
            raise Unavailable(self._not_ready_message())
        timeout = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = kind(
            next(self._ids),
            fmt,
            body,
            now + timeout,
            loop.create_future(),
            enqueued=now,
            fields=fields,
        )
        while worker is not None and not self._send(worker, pending):
            # on_unreachable took that worker out of rotation: try the next one.
            worker = None if worker.ready else self._pool.pick()
        if worker is None:
            if len(self._queue) >= self._queue_size:
                raise QueueFull(
                    f"all workers are busy and the queue is full ({self._queue_size} waiting)"
                )
            self._queue.append(pending)
            pending.queued = True
        # A timer per request rather than asyncio.wait_for around each wait: no
        # extra future, callback or loop turn per reply (it was a profile hot spot).
        pending.timer = loop.call_later(timeout, self._expire, pending)
        self._outstanding += 1
        self._idle.clear()
        return pending

    def drop(self, pending: Pending) -> None:
        """Take ``pending`` out of the queue now (its caller left), if it waits there."""
        if pending.queued:
            self._queue.remove(pending)
            pending.queued = False

    async def result(self, pending: Pending) -> Reply:
        """Wait for ``pending`` until its deadline (504). Cancelling drops it if still queued."""
        try:
            return await pending.future
        finally:
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
            if pending.queued:
                # Not started: nobody will ever want it (deadline passed, or the client left).
                self._queue.remove(pending)
                pending.queued = False
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()

    def _expire(self, pending: Pending) -> None:
        """The deadline passed: answer 504 (a reply that comes later is dropped)."""
        pending.timer = None
        if not pending.future.done():
            text = self._deadline_text(pending)
            if pending.queued and not self._pool.ready_workers():
                # It waited for a worker that was coming and did not come in time.
                waited = self._not_ready_message()
                message = f"no worker became ready within the deadline of {text}: {waited}"
            else:
                message = f"no answer within the deadline of {text}"
            pending.settle(DeadlineExceeded(message))

    def _deadline_text(self, pending: Pending) -> str:
        return f"{pending.deadline - pending.enqueued:.3g}s"

    def on_reply(self, worker: WorkerRecord, message: dict[str, Any], frames: list[bytes]) -> None:
        # Typed as sent; each value is still checked, since a worker may be of any make.
        header = cast(protocol.ReplyHeader, message)
        request_id = header.get("id")
        pending = worker.inflight.pop(request_id, None) if isinstance(request_id, int) else None
        if pending is None:
            return  # answered after its worker was declared dead: already settled
        worker.requests_served += 1
        code = header.get("code")
        if code == protocol.OK:
            fields = {k: v for k, v in message.items() if k not in _REPLY_KEYS}
            pending.settle(Reply(str(header.get("fmt", protocol.FMT_JSON)), frames[0], fields))
        else:
            details = header.get("details")
            pending.settle(
                error_from_code(
                    str(code),
                    str(header.get("message", "the worker reported an error")),
                    **(details if isinstance(details, dict) else {}),
                )
            )
        self.pump()

    def pump(self) -> None:
        """Move queued requests to workers that have credit."""
        while self._queue:
            worker = self._pool.pick()
            if worker is None:
                return
            pending = self._queue.popleft()
            pending.queued = False
            if not pending.future.done() and not self._send(worker, pending):
                self._queue.appendleft(pending)
                pending.queued = True
                return

    def worker_lost(self, worker: WorkerRecord, how: str, retry: bool = True) -> None:
        """Settle every request ``worker`` held: retry elsewhere, or answer 503.

        The caller has already taken ``worker`` out of rotation (its state is no
        longer READY), so no retry can be sent back to it. ``retry`` False answers
        them all 503: requests that hung a worker would hang the next one too.
        """
        assert not worker.ready, "worker_lost() on a worker still in rotation"
        held = [p for p in worker.inflight.values() if not p.future.done()]
        worker.inflight.clear()
        # A retry goes to another ready worker, or waits for one that is coming
        # (this worker's own replacement among them).
        elsewhere = any(w is not worker for w in self._pool.ready_workers()) or bool(
            self._pool.coming()
        )
        for pending in reversed(held):  # appendleft keeps their original order
            pending.attempts += 1
            if retry and pending.attempts < MAX_ATTEMPTS and elsewhere and pending.retryable:
                self._queue.appendleft(pending)
                pending.queued = True
            else:
                pending.settle(
                    Unavailable(f"worker {worker.slot} {how} before answering this request")
                )
        self.give_up_waiting(f"worker {worker.slot} {how}")
        self.pump()

    def give_up_waiting(self, why: str | None = None) -> None:
        """Answer the queue 503 now if no worker is ready and none is coming.

        The supervisor calls this whenever a worker stops coming (a crash loop
        begins, a slot fails, the gateway stops, a slot is scaled away);
        ``why`` is the event, added to the message.
        """
        if not self._queue or self._pool.ready_workers() or self._pool.coming():
            return
        message = self._not_ready_message()
        self.fail_queued(Unavailable(f"{message}: {why}" if why else message))

    def abandon_all(self, error: TorchpoolError) -> None:
        """Answer every outstanding request with ``error`` now (a hurried shutdown).

        Work already on a worker may still finish there; its reply is dropped.
        """
        self.fail_queued(error)
        for worker in self._pool.all_records():
            for pending in worker.inflight.values():
                pending.settle(error)
            worker.inflight.clear()

    def fail_queued(self, error: TorchpoolError) -> None:
        while self._queue:
            pending = self._queue.popleft()
            pending.queued = False
            pending.settle(error)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is outstanding; False if ``timeout_s`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _send(self, worker: WorkerRecord, pending: Pending) -> bool:
        """Hand ``pending`` to ``worker``; False (and the worker is given up) if it is gone."""
        now = time.monotonic()
        remaining_ms = max(0.0, pending.deadline - now) * 1000
        header: protocol.RequestHeader = {
            **(pending.fields or {}),  # first, so it cannot shadow the fields below
            "t": protocol.REQUEST,
            "v": protocol.VERSION,
            "id": pending.id,
            "fmt": pending.fmt,
            "queued": len(self._queue),
            # Time left, not a wall-clock deadline: a remote worker's clock may be off.
            "timeout_ms": int(remaining_ms),
        }
        try:
            frames = [self._pack(header), pending.body]
            self._transport.send(worker.data_identity, frames, worker.link)
        except zmq.ZMQError as exc:
            log.warning("%s is unreachable (%s)", worker.name, exc)
            if self._on_unreachable is not None:
                self._on_unreachable(worker)
            return False
        worker.inflight[pending.id] = pending
        if self.on_first_send is not None and pending.attempts == 0:
            self.on_first_send(now - pending.enqueued)
        return True

    def _not_ready_message(self) -> str:
        """Why nothing can take a request now: no worker is ready and none is coming."""
        if self._pool.draining:
            return "the server is shutting down"
        states = collections.Counter(w.shown_state() for w in self._pool.serving())
        if not states:
            return "no worker is connected"
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        looping = self._pool.crash_looping()
        if looping:
            last = looping[0].last_error
            slots = ", ".join(str(w.slot) for w in looping)
            return (
                f"no worker is ready ({summary}): worker {slots} keeps dying before it "
                "is ready (a crash loop)" + (f"; last: {last}" if last else "")
            )
        return f"no worker is ready ({summary})"
