"""In-memory stand-ins for the gateway's seams: the wire, worker processes, the clock.

With them the dispatcher's and the supervisor's logic is tested without sockets,
processes or waiting (tests/test_dispatch_fast.py, tests/test_supervisor_fast.py);
the real ones are covered by the tests that start `torchpool serve`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from gateway.pool.transport import LOCAL, Handler
from gateway.pool.workers import WorkerRecord
from shared import protocol

# A bound on the event-loop turns a test waits for something, instead of a time.
MAX_TURNS = 1000


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop; pytest sees a plain test function
    (with the same fixtures)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


async def eventually(condition: Callable[[], object], what: str) -> None:
    """Let the event loop run until ``condition()`` holds; fail after MAX_TURNS turns."""
    for _ in range(MAX_TURNS):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


@dataclass(frozen=True)
class Sent:
    """One message the gateway sent: its decoded header and the frames after it."""

    link: int
    identity: bytes
    header: dict[str, Any]
    frames: list[bytes]


class FakeTransport:
    """The gateway's end of the wire, in memory: it records what is sent.

    A peer whose identity is in ``gone`` is unreachable: sending to it raises
    EHOSTUNREACH, as ZeroMQ's ROUTER_MANDATORY does.
    """

    endpoint = "inproc://fake-gateway"
    remote_endpoint: str | None = None

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.gone: set[bytes] = set()
        self.handler: Handler | None = None
        self.closed = False

    def start(self, handler: Handler) -> None:
        self.handler = handler

    def send(self, identity: bytes, frames: Sequence[bytes], link: int = LOCAL) -> None:
        if identity in self.gone:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.sent.append(Sent(link, identity, protocol.unpack_header(frames[0]), list(frames[1:])))

    def close(self) -> None:
        self.closed = True

    def requests(self, worker: WorkerRecord) -> list[int]:
        """The ids of the requests sent to ``worker``'s current process, in order."""
        return [
            int(m.header["id"])
            for m in self.sent
            if m.identity == worker.data_identity and m.header["t"] == protocol.REQUEST
        ]

    def controls(self, worker: WorkerRecord, kind: str) -> list[dict[str, Any]]:
        """The control messages of type ``kind`` sent to ``worker``'s current process."""
        return [
            m.header
            for m in self.sent
            if m.identity == worker.control_identity and m.header["t"] == kind
        ]


class FakeProcess:
    """A worker process that exits only when the test (or a kill) says so."""

    def __init__(self, pid: int, argv: Sequence[str], env: Mapping[str, str], label: str) -> None:
        self.pid = pid
        self.argv = list(argv)
        self.env = dict(env)
        self.label = label
        self.stderr_tail: list[str] = []
        self.killed = False
        self.killed_by_us = False
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def uid(self) -> str:
        return self.argv[self.argv.index("--uid") + 1]

    def exit(self, code: int) -> None:
        """The process ends with ``code`` (negative: killed by that signal)."""
        if not self._exit.done():
            self._exit.set_result(code)

    def is_alive(self) -> bool:
        return not self._exit.done()

    def exit_status(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def kill(self) -> None:
        self.killed = True
        self.killed_by_us = self.is_alive()
        self.exit(-signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def stop(self, grace_s: float) -> int:
        self.exit(-signal.SIGTERM)
        return await self.wait()


class FakeSpawner:
    """Starts FakeProcesses instead of `python -m worker`; keeps every one it started."""

    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self._pids = itertools.count(10_000)
        # Raised instead of starting the process that would be number N (from 0).
        self.cannot_start: dict[int, OSError] = {}

    async def __call__(
        self, argv: Sequence[str], env: Mapping[str, str], label: str
    ) -> FakeProcess:
        error = self.cannot_start.pop(len(self.processes), None)
        if error is not None:
            raise error
        process = FakeProcess(next(self._pids), argv, env, label)
        self.processes.append(process)
        return process

    def of(self, worker: WorkerRecord) -> FakeProcess:
        """The process started for ``worker``'s current generation."""
        return next(p for p in self.processes if p.uid == worker.uid)


class FakeClock:
    """Monotonic time that moves only when a test calls ``advance``.

    ``sleep`` (for the supervisor's ``sleep=``) waits until the clock has been
    advanced past its end; ``sleeping`` shows what is waiting, and for how long.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + delay, delay, wake)
        self._sleepers.append(entry)
        try:
            await wake
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def sleeping(self) -> list[float]:
        """The delays asked for by the sleeps still waiting, in the order they began."""
        return [delay for _, delay, wake in self._sleepers if not wake.done()]

    async def advance(self, seconds: float) -> None:
        """Move time on, wake the sleeps that are due, and let them run."""
        self.now += seconds
        due = [wake for end, _, wake in self._sleepers if end <= self.now and not wake.done()]
        for wake in due:
            wake.set_result(None)
        await eventually(
            lambda: not any(wake in due for _, _, wake in self._sleepers),
            "the sleeps that were due to return",
        )
