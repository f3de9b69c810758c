"""The gateway's side of a stream on the wire: chunks in, credit and cancel out.

A streamed request is a :class:`StreamPending`: the dispatcher queues, sends,
retries and times it out like any request, and its future settles when the
stream ends (END, an error REPLY, a worker's death, the deadline). Between
send and end, the worker's CHUNKs land in ``chunks`` in order, and whoever
writes them to the client (:mod:`gateway.api.sse`) grants credit back with
:func:`grant` after each write and calls :func:`cancel` when the client goes.

A stream that has received no chunk yet is retried on another worker when
its worker dies, as any request is; once output has come, it is not: the
client has already seen part of an answer, so it gets an error instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Any

import zmq

from gateway.pool.dispatch import Dispatcher
from gateway.pool.pending import Pending, Reply
from gateway.pool.transport import Transport
from gateway.pool.workers import Pool, WorkerRecord
from shared import protocol
from shared.errors import TorchpoolError, Unavailable

log = logging.getLogger("torchpool.streams")

# Chunks a worker may send ahead of what the client has been written.
CREDIT = protocol.STREAM_CREDIT


@dataclass(eq=False, slots=True)
class StreamPending(Pending):
    """A request answered by a stream of chunks (each a JSON document's bytes)."""

    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    received: int = 0  # chunks that came from the worker so far
    holder: WorkerRecord | None = None  # the worker that sent the last chunk
    # Resolved when a chunk arrives, for the writer that waits on it.
    arrived: asyncio.Future[None] | None = None

    @property
    def retryable(self) -> bool:
        return self.received == 0

    def settle(self, result: Reply | TorchpoolError) -> None:
        if isinstance(result, Unavailable) and self.received:
            result = Unavailable(
                f"{result.message}; the stream had sent {self.received} outputs and is not retried"
            )
        Pending.settle(self, result)

    def wake(self) -> None:
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)


def on_message(
    dispatcher: Dispatcher, worker: WorkerRecord, header: dict[str, Any], frames: list[bytes]
) -> None:
    """A CHUNK or END from ``worker``'s data channel."""
    request_id = header.get("id")
    pending = worker.inflight.get(request_id) if isinstance(request_id, int) else None
    if not isinstance(pending, StreamPending):
        return  # cancelled, timed out, or its worker was declared dead: already settled
    if header["t"] == protocol.CHUNK:
        if header.get("seq") != pending.received or not frames:
            log.warning("stream %d: chunk %r out of order from %s", pending.id, header, worker.uid)
        pending.received += 1
        pending.holder = worker
        pending.chunks.append(frames[0] if frames else b"null")
        pending.wake()
    else:
        del worker.inflight[pending.id]
        worker.requests_served += 1
        pending.settle(Reply(protocol.FMT_JSON, b""))
        dispatcher.pump()


def _holder(pool: Pool, pending: StreamPending) -> WorkerRecord | None:
    """The worker running ``pending`` now, if any."""
    if pending.holder is not None and pending.holder.inflight.get(pending.id) is pending:
        return pending.holder
    for worker in pool.all_records():
        if worker.inflight.get(pending.id) is pending:
            return worker
    return None


def grant(pool: Pool, transport: Transport, pending: StreamPending, n: int) -> None:
    """Let the worker send ``n`` more chunks: that many were written to the client."""
    worker = _holder(pool, pending)
    if worker is not None:
        _send(transport, worker, {"t": protocol.CREDIT, "id": pending.id, "n": n})


def cancel(
    pool: Pool, transport: Transport, dispatcher: Dispatcher, pending: StreamPending
) -> None:
    """Stop ``pending`` on its worker (which closes the generator) and forget it here.

    A no-op for a stream no worker holds (ended, or still queued).
    """
    worker = _holder(pool, pending)
    if worker is None:
        return
    del worker.inflight[pending.id]
    _send(transport, worker, {"t": protocol.CANCEL, "id": pending.id})
    dispatcher.pump()  # the worker's credit is free again


def _send(transport: Transport, worker: WorkerRecord, header: dict[str, Any]) -> None:
    try:
        transport.send(worker.data_identity, [protocol.pack(header)], worker.link)
    except zmq.ZMQError as exc:
        # The worker is gone; the supervisor settles what it held.
        log.debug("could not send %s to worker %s: %s", header["t"], worker.uid, exc)
