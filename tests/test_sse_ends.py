"""Fast tier: a stream the gateway has started always ends with ``end`` or ``error``,
and a stream whose client left is out of the queue at once. An in-memory wire,
no worker, no HTTP server: ``write_stream`` is driven with ASGI callables."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.api import sse
from gateway.pool import streams
from gateway.pool.dispatch import Dispatcher
from gateway.pool.placement import Placement
from gateway.pool.workers import Pool, State
from shared import protocol
from tests.fakes import FakeTransport, eventually, on_loop

pytestmark = pytest.mark.fast


@dataclass
class Model:
    """What write_stream uses of a ModelRuntime."""

    pool: Pool
    transport: FakeTransport
    dispatcher: Dispatcher


def model(ready: bool = True) -> Model:
    pool = Pool([Placement(0, "cpu", None, (0,))])
    pool.workers[0].state = State.READY if ready else State.LOADING
    pool.workers[0].capacity = 1
    wire = FakeTransport()
    return Model(pool, wire, Dispatcher(pool, wire, queue_size=8, timeout_s=30.0))


class Client:
    """The ASGI side: records what was sent; ``leave()`` disconnects."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    async def receive(self) -> Any:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self._gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def closed(self) -> bool:
        return bool(self.sent) and self.sent[-1].get("more_body") is False


def run(m: Model, client: Client) -> asyncio.Task[int]:
    request = (protocol.FMT_JSON, b"{}", None, protocol.RequestExtras())
    return asyncio.ensure_future(
        sse.write_stream(m, client.receive, client.send, request, sse.PREDICT_FRAMING)  # type: ignore[arg-type]
    )


@on_loop
async def test_a_stream_cut_short_in_the_gateway_after_the_200_ends_with_an_error_event() -> None:
    m, client = model(), Client()
    task = run(m, client)
    await eventually(lambda: m.pool.workers[0].inflight, "the stream to reach the worker")
    (pending,) = m.pool.workers[0].inflight.values()
    header = {"t": protocol.CHUNK, "id": pending.id, "seq": 0}
    streams.on_message(m.dispatcher, m.pool.workers[0], header, [b'{"output": 0}'])
    await eventually(lambda: b'"output"' in client.body, "the first event")
    task.cancel()  # the server's task ends in the middle of the stream
    await asyncio.gather(task, return_exceptions=True)
    assert client.body.endswith(b"\n\n") and b"event: error" in client.body
    assert client.closed


@on_loop
async def test_a_waiting_stream_whose_client_left_is_out_of_the_queue_at_once() -> None:
    m, client = model(ready=False), Client()  # loading: the stream waits in the queue
    task = run(m, client)
    await eventually(lambda: m.dispatcher.queued == 1, "the stream to wait")
    client.leave()
    assert await task == 499
    assert m.dispatcher.queued == 0
    m.pool.workers[0].state = State.READY
    m.dispatcher.pump()  # a worker ready now gets nothing nobody reads
    assert m.pool.workers[0].inflight == {}
