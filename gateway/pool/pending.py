"""A request in flight between the gateway and a worker, and the reply it waits for.

A leaf module: the dispatcher creates :class:`Pending` requests, and a
:class:`gateway.pool.workers.WorkerRecord` holds the ones its worker owes an
answer, so both import these types from here and not from each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from shared import protocol
from shared.errors import TorchpoolError


@dataclass(frozen=True, slots=True)
class Reply:
    fmt: str
    body: bytes
    # The REPLY header's other fields, e.g. json_len of a v2binary body.
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Pending:
    id: int
    fmt: str
    body: bytes
    deadline: float  # time.monotonic()
    future: asyncio.Future[Reply]
    attempts: int = 0
    queued: bool = False  # waiting in the dispatcher's queue (kept so nobody scans it)
    enqueued: float = field(default_factory=time.monotonic)
    # More REQUEST header fields for the worker, e.g. a v2 body's json_len.
    fields: protocol.RequestExtras | None = None
    # Fails the future at the deadline (504); cancelled once the caller has its answer.
    timer: asyncio.TimerHandle | None = None

    @property
    def retryable(self) -> bool:
        """Whether a worker's death may send this request to another worker."""
        return True

    def settle(self, result: Reply | TorchpoolError) -> None:
        if self.future.done():
            return  # the caller gave up already (deadline)
        if isinstance(result, Reply):
            self.future.set_result(result)
        else:
            self.future.set_exception(result)
