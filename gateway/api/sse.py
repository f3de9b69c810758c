"""Server-Sent Events: a streamed request's chunks written to the client as they come.

    POST /predict with ``Accept: text/event-stream``, on a model whose handler streams:

        200 text/event-stream
        data: {"output": ...}            one event per output, as soon as it is made
        ...
        event: end                       the stream is complete
        data: {}

    An error once events have been sent ends the stream with
    ``event: error`` / ``data: {"error": ..., "code": ...}`` (a 504's code past
    the deadline); one before the first event is an ordinary JSON error with
    its status. The Open Inference Protocol's ``generate_stream``
    (:mod:`gateway.api.generate`) writes the same way, Triton's shapes inside.

Nothing is buffered: each chunk is one ``send`` to uvicorn, which writes it
to the socket at once (chunked transfer encoding). When the client reads
slowly, uvicorn's ``send`` waits for its buffer to drain; credit goes back to
the worker only after a write, so the worker pauses instead of piling up
chunks. When the client disconnects, the worker is told (CANCEL) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.types import Receive, Scope, Send

from gateway.api.http import RequestHeaders, disconnected, send_error
from gateway.api.predict import Exchange, PredictRoute, Prepared
from gateway.pool import streams
from gateway.pool.streams import StreamPending
from gateway.pool.workers import Pool
from shared.errors import ModelNotFound, TorchpoolError

if TYPE_CHECKING:
    from gateway.pool.model import ModelRuntime
from shared.errors import Unavailable

EVENT_STREAM: Final = b"text/event-stream"
_HEADERS: Final = [
    (b"content-type", EVENT_STREAM),
    (b"cache-control", b"no-cache"),
    # nginx and similar proxies buffer responses unless told not to.
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True)
class Framing:
    """How one endpoint frames the end of a stream and its errors."""

    # The last event of a complete stream; b"" for none.
    end: bytes
    # An error's data line.
    error_json: Callable[[TorchpoolError], bytes]
    # An error before any event: a whole HTTP response.
    send_error: Callable[[Send, TorchpoolError], Any]


PREDICT_FRAMING: Final = Framing(
    end=b"event: end\ndata: {}\n\n",
    error_json=lambda error: orjson.dumps(error.to_json()),
    send_error=send_error,
)


def model_streams(pool: Pool) -> bool:
    """Whether the served model streams, as its ready workers said in READY.

    With none ready (all being replaced), the last word of any worker that was:
    a stream request must wait for a streaming worker as a stream, not turn into
    an ordinary request because its worker happens to be restarting.
    """
    known = pool.ready_workers() or [w for w in pool.serving() if w.signature is not None]
    return any(
        worker.signature is not None and worker.signature.get("stream") is True for worker in known
    )


async def write_stream(
    runtime: ModelRuntime,
    receive: Receive,
    send: Send,
    request: Prepared,
    framing: Framing,
) -> int:
    """Run ``request`` (fmt, body, timeout, REQUEST header fields) as a stream and write
    it out; the HTTP status it answered (499 when the client left first).

    Errors from the dispatcher before anything was sent are raised, for the
    caller to answer as usual.
    """
    fmt, body, timeout_s, fields = request
    dispatcher = runtime.dispatcher
    fields = {**(fields or {}), "stream": True, "credit": streams.CREDIT}
    pending = dispatcher.enqueue(fmt, body, timeout_s, fields, kind=StreamPending)
    assert isinstance(pending, StreamPending)
    done = asyncio.ensure_future(dispatcher.result(pending))
    left = asyncio.ensure_future(disconnected(receive))
    started = ended = False
    loop = asyncio.get_running_loop()
    try:
        while True:
            written = 0
            while pending.chunks and not left.done():
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                    started = True
                chunk = pending.chunks.popleft()
                await _write(send, b"data: " + chunk + b"\n\n")
                written += 1
            if written:
                streams.grant(runtime.pool, runtime.transport, pending, written)
            if left.done():
                return 499
            if done.done() and not pending.chunks:
                break
            pending.arrived = loop.create_future()
            waiting: set[asyncio.Future[Any]] = {pending.arrived, done, left}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        try:
            done.result()
        except TorchpoolError as error:
            if not started:
                await framing.send_error(send, error)
                return error.status
            ended = True
            await _write(send, b"event: error\ndata: " + framing.error_json(error) + b"\n\n")
        else:
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            ended = True
            if framing.end:
                await _write(send, framing.end)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200
    finally:
        left.cancel()
        # Out of the queue now, not when ``done`` gets to its cancellation: a worker
        # freed meanwhile would take a stream nobody reads.
        dispatcher.drop(pending)
        done.cancel()
        # Still on a worker (the client left, or the deadline passed): stop it there.
        streams.cancel(runtime.pool, runtime.transport, dispatcher, pending)
        if started and not ended and not left.done():
            # Leaving by an exception (a bug, a cancelled task) after the 200: the
            # client still reads, so it is told the stream is over, not left to
            # guess from a closed connection.
            await _end_in_error(send, framing)


async def _end_in_error(send: Send, framing: Framing) -> None:
    error = Unavailable("the stream was interrupted in the gateway")
    with contextlib.suppress(Exception):
        await _write(send, b"event: error\ndata: " + framing.error_json(error) + b"\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _write(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


class StreamPredictHandler(PredictRoute):
    """``POST /predict`` answered as Server-Sent Events (see the module docstring)."""

    def wants(self, scope: Scope, headers: RequestHeaders, model_name: str | None = None) -> bool:
        """A POST that asks for events, to a model that streams; others go the usual way
        (an unknown model included: /predict answers its 404)."""
        if scope["method"] != "POST":
            return False
        if headers.accept is None or EVENT_STREAM not in headers.accept.lower():
            return False
        try:
            model = self._runtime_of().model(model_name)
        except ModelNotFound:
            return False
        return model_streams(model.pool)

    async def answer(
        self,
        exchange: Exchange,
        scope: Scope,
        headers: RequestHeaders,
        receive: Receive,
        send: Send,
        model_name: str | None,
    ) -> None:
        model, request = await self.prepare(exchange, headers, receive, model_name)
        exchange.status = await write_stream(model, receive, send, request, PREDICT_FRAMING)
