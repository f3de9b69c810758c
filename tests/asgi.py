"""The whole gateway app, served in-process over fakes: the fast tier's HTTP harness.

``serving(...)`` builds the app with ``create_app`` as ``torchpool serve`` does,
runs its lifespan, and hands back an ``httpx.AsyncClient`` that talks to it
through ``httpx.ASGITransport``: no port, no socket, no worker process. The
runtime under it is the real one (models, dispatchers, supervisors, routing of
worker messages) over the fakes of tests/fakes.py, and a fake worker side:

- every spawned worker is a FakeProcess; ``Served.ready()`` has each say HELLO
  and READY on its control channel, as ``python -m worker`` does once loaded;
- each REQUEST sent to a worker is given to ``Served.answer`` (when set), whose
  messages come back on that worker's data channel, REPLY or CHUNK/END, per
  :mod:`shared.protocol`; unset, requests stay unanswered;
- a STOP makes the process exit 0, so the lifespan's shutdown never waits out
  a grace period.

The same routes with real workers are in test_hostile_input.py, test_faults.py, test_v2.py,
test_streaming.py, test_admin_auth.py and test_multimodel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from gateway.api.app import TorchpoolApp, create_app
from gateway.pool.model import Seams
from gateway.pool.runtime import Runtime
from gateway.pool.transport import LOCAL
from shared import modelconfig, protocol
from shared.config import ServeSettings
from tests.fakes import FakeClock, FakeSpawner, FakeTransport, Sent

BASE_URL = "http://torchpool.test"


@dataclass(frozen=True)
class Message:
    """One message a fake worker sends on its data channel."""

    header: dict[str, Any]
    frames: list[bytes] = field(default_factory=list)


# A fake worker's answer to one REQUEST: the messages it sends back, in order.
Answer = Callable[[Sent], Sequence[Message]]


def reply(sent: Sent, body: bytes, fmt: str | None = None, **fields: Any) -> Message:
    """A successful REPLY to ``sent``, in the request's format unless ``fmt`` says."""
    header = {"t": protocol.REPLY, "id": sent.header["id"], "code": protocol.OK}
    header["fmt"] = fmt or sent.header["fmt"]
    return Message({**header, **fields}, [body])


def error_reply(sent: Sent, code: str, message: str, **details: Any) -> Message:
    """A REPLY carrying one of shared.errors' codes, as a worker sends a failure."""
    header = {"t": protocol.REPLY, "id": sent.header["id"], "code": code, "message": message}
    if details:
        header["details"] = details
    return Message(header)


def chunk(sent: Sent, seq: int, event: Any) -> Message:
    """One CHUNK of a stream: the JSON of one Server-Sent Event's data line."""
    header = {"t": protocol.CHUNK, "id": sent.header["id"], "seq": seq}
    return Message(header, [orjson.dumps(event)])


def end(sent: Sent) -> Message:
    return Message({"t": protocol.END, "id": sent.header["id"]})


def echo(sent: Sent) -> Sequence[Message]:
    """The default answer: the request's body back, as ``{"prediction": ...}`` would be."""
    return [reply(sent, bytes(sent.frames[0]))]


class FakeWire(FakeTransport):
    """The in-memory wire with a fake worker side answering at its far end."""

    def __init__(self, spawner: FakeSpawner) -> None:
        super().__init__()
        self.spawner = spawner
        self.answer: Answer | None = echo

    def send(self, identity: bytes, frames: Sequence[bytes], link: int = LOCAL) -> None:
        super().send(identity, frames, link)
        sent = self.sent[-1]
        uid, _ = protocol.split_identity(identity)
        if sent.header["t"] == protocol.REQUEST and self.answer is not None:
            # On a later turn, as a reply off a socket would come: never inside send().
            asyncio.get_running_loop().call_soon(self._answer, self.answer, sent)
        elif sent.header["t"] == protocol.STOP:
            for process in self.spawner.processes:
                if process.uid == uid:
                    process.exit(0)

    def _answer(self, answer: Answer, sent: Sent) -> None:
        for message in answer(sent):
            self.deliver(sent.identity, message)

    def deliver(self, identity: bytes, message: Message) -> None:
        """``message`` arrives from the peer ``identity``, as the transport delivers it."""
        assert self.handler is not None, "the runtime has not started the transport"
        self.handler(LOCAL, identity, message.header, message.frames)


@dataclass
class Served:
    """A running app over fakes, and the client that talks to it."""

    app: TorchpoolApp
    runtime: Runtime
    wire: FakeWire
    spawner: FakeSpawner
    clock: FakeClock
    client: httpx.AsyncClient

    @property
    def answer(self) -> Answer | None:
        return self.wire.answer

    @answer.setter
    def answer(self, answer: Answer | None) -> None:
        self.wire.answer = answer

    def ready(self, stream: bool = False, capacity: int = 1, **ready_fields: Any) -> None:
        """Every live worker process says HELLO, then READY (``stream``: its model streams)."""
        for process in self.spawner.processes:
            if not process.is_alive():
                continue
            control = protocol.control_identity(process.uid)
            hello = {"t": protocol.HELLO, "v": protocol.VERSION, "uid": process.uid}
            self.wire.deliver(control, Message({**hello, "pid": process.pid, "host": "test"}))
            signature = {"source": "demo", "outputs": None, "stream": stream}
            ready = {
                "t": protocol.READY,
                "uid": process.uid,
                "load_s": 0.1,
                "capacity": capacity,
                "input_shape": [16],
                "input_dtype": "float32",
                "signature": signature,
                "rss_bytes": 1 << 20,
            }
            self.wire.deliver(control, Message({**ready, **ready_fields}))

    def requests(self) -> list[Sent]:
        """Every REQUEST the gateway sent, in order."""
        return [m for m in self.wire.sent if m.header["t"] == protocol.REQUEST]


@contextlib.asynccontextmanager
async def serving(config: modelconfig.Config | None = None, **flags: Any) -> AsyncIterator[Served]:
    """The app of ``torchpool serve`` with these flags (or ``config``), over fakes.

    Its workers are spawned but not ready: call ``Served.ready()``.
    """
    spawner = FakeSpawner()
    clock = FakeClock()
    wire = FakeWire(spawner)
    seams = Seams(spawner=spawner, clock=clock, sleep=clock.sleep)

    def make_runtime(config: modelconfig.Config, on_fatal: Callable[[str], None]) -> Runtime:
        return Runtime(config, on_fatal, wire, seams)

    settings: ServeSettings | modelconfig.Config = config or ServeSettings(
        **{"workers": 1, "device": "cpu", **flags}
    )
    app = create_app(settings, make_runtime=make_runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield Served(app, app.state.runtime, wire, spawner, clock, client)
