"""The serving loop: requests off the data socket, through the model, replies back.

One thread does all of it, so the data socket has one owner. The loop sleeps
in a ``zmq.Poller`` over the data socket, the control thread's inproc end and
the signal pipe; it wakes for work or for a reason to stop, never on a timer.

Replies (see :mod:`shared.protocol`):

    ok      [ {t: reply, id, code: "ok", fmt, json_len?} | body ]
    error   [ {t: reply, id, code, message, details} ]

Whatever goes wrong with one request becomes that request's error reply
(``internal`` when it is nobody's fault we know of); the worker lives on.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import zmq

from shared import protocol
from shared.errors import DeadlineExceeded, RequestError, TorchpoolError
from worker.codec import openai as openaicodec
from worker.codec import predict as codec
from worker.codec import rawbody, tensors
from worker.codec import v2 as v2codec
from worker.codec.inputs import Codec, InputSpec
from worker.control import ControlThread, WorkerState
from worker.lending import Lending
from worker.model.loading import LoadedModel
from worker.serve import batching, streaming
from worker.serve.batching import Job
from worker.serve.failure import model_failure
from worker.serve.pacing import Pacer
from worker.serve.sizing import BatchSizer
from worker.signals import SignalWake

# Socket flags as plain ints, frame by frame: pyzmq's send_multipart and
# recv_multipart combine enum.Flag members per frame, and a two-frame message
# sent and read that way measured 16 us against 6.5 us with these.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_NOBLOCK_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)


@dataclass(frozen=True)
class Stop:
    """Why the loop ended, and whether held and queued requests are still answered."""

    reason: str
    drain: bool
    # The worker's exit status: non-zero when it stops because something broke.
    status: int = 0


class ServingLoop:
    """Serves ``model`` on ``data`` (a connected DEALER owned by this thread)."""

    def __init__(
        self,
        data: zmq.Socket[bytes],
        model: LoadedModel,
        state: WorkerState,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_body_bytes: int,
        threads: int = 1,
        lending: Lending | None = None,
    ) -> None:
        self._data = data
        self._model = model
        self._state = state
        # Rows per batch: learned from the passes, never past --max-batch-size.
        self._sizer = BatchSizer(max_batch_size)
        # The worker's own intra-op threads; a pass that borrows idle cores has more.
        self._threads = threads
        self._lending = lending
        self._pacer = Pacer(max_batch_delay_ms / 1000)
        self._codecs = codecs(model, max_body_bytes)
        # Decoded requests that did not fit the last batch; they go first next time.
        self.pending: deque[Job] = deque()
        # Set by serve(): what wakes the loop, and why it must stop once it must.
        self._poller: zmq.Poller | None = None
        self._watched: tuple[ControlThread, SignalWake] | None = None
        self._stop: Stop | None = None
        # A model with predict_stream runs its requests one by one there, unbatched.
        self._streams: streaming.StreamRunner | None = None
        if model.stream is not None:
            self._streams = streaming.StreamRunner(
                data,
                model,
                state,
                self._codecs,
                admit=self._admit,
                send=self._send,
                reply_error=self._reply_error,
                interrupted=self._stream_interrupted,
                wait=self._wait,
            )

    def serve(self, control: ControlThread, signals: SignalWake) -> Stop:
        """Answer requests until a signal, a STOP, or the parent's death."""
        poller = zmq.Poller()
        poller.register(self._data, zmq.POLLIN)
        poller.register(control.main_end, zmq.POLLIN)
        poller.register(signals.fd, zmq.POLLIN)
        self._poller, self._watched = poller, (control, signals)
        control_end, signal_fd = control.main_end, signals.fd
        while True:
            # A stream may have taken in a reason to stop already (see _watch).
            events = dict(poller.poll(0 if self.pending or self._stop else None))
            # Both wakers stay readable until read (a zmq socket, a pipe), so
            # looking only when the poller says so misses nothing, and spares
            # each request the two reads that would find nothing.
            woken = self._stop is not None or control_end in events or signal_fd in events
            if woken and (stop := self._watch()) is not None:
                return stop
            if self._data in events or self.pending:
                self.step()

    def _watch(self) -> Stop | None:
        """Why serving must stop, once there is a reason: a stop signal, or the control
        thread's event (STOP from the gateway, the parent gone, the thread dead).

        The first reason is kept, except that losing the parent or the control
        thread also cuts a drain short: nobody is left to answer.
        """
        if self._watched is None:
            return None
        control, signals = self._watched
        signals.drain()
        if self._stop is None and (reason := signals.stop_reason) is not None:
            self._stop = Stop(reason, drain=True)
        while (event := control.read_event()) is not None:
            kind, reason = event
            stop = Stop(reason, drain=kind == "stop", status=int(kind == "failed"))
            if self._stop is None or not stop.drain:
                self._stop = stop
        return self._stop

    def _stream_interrupted(self) -> str | None:
        """Why the stream running now must end before its next output, if it must.

        A stop signal, or nobody left to answer, ends it; a STOP from the gateway
        lets it run to its end, as a drain answers every request held (the
        supervisor escalates to SIGTERM past --drain-timeout-s).
        """
        stop = self._watch()
        if stop is not None and not stop.drain:
            return stop.reason
        return None if self._watched is None else self._watched[1].stop_reason

    def _wait(self, timeout_s: float) -> None:
        """Sleep until a message, a signal or a control event comes, at most ``timeout_s``."""
        timeout_ms = max(1, math.ceil(timeout_s * 1000))
        if self._poller is None:
            self._data.poll(timeout_ms)
        else:
            self._poller.poll(timeout_ms)

    def drain(self) -> None:
        """Answer everything held or already queued on the socket, then return."""
        while self.pending or self._data.poll(0):
            self.step()

    def step(self) -> None:
        """Collect one batch and answer every request in it."""
        if self._streams is not None:
            self._streams.step(self.pending, self._receive)
            return
        lending = self._lending
        # Sized for the threads of the last pass: the limit only bites under
        # load, when passes follow each other with the same threads.
        threads = self._state.threads or self._threads
        limit = self._sizer.limit(threads)
        jobs = batching.collect(self.pending, self._receive, limit, self._pacer)
        if not jobs:
            return
        self._state.busy = True
        try:
            threads = self._threads
            if lending is not None:
                rows = sum(job.rows for job in jobs)
                own = self._threads
                threads = lending.start(
                    self._pacer.forward_s,
                    lambda wider: self._sizer.lend_pays(own, wider, rows),
                )
            self._run(jobs, threads)
        finally:
            if lending is not None:
                lending.end()
            self._state.busy = False

    # --- intake -------------------------------------------------------------

    def _receive(self, timeout_s: float) -> Job | None:
        """The next well-formed request within ``timeout_s``; bad ones are answered here."""
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                frames = [self._data.recv(_NOBLOCK, copy=False)]
                while frames[-1].more:  # the rest of a message is already here
                    frames.append(self._data.recv(_NOBLOCK, copy=False))
            except zmq.Again:
                if not await_message(self._data, give_up):
                    return None
                continue
            job = self._admit(frames)
            if job is not None:
                return job

    def _admit(self, frames: list[zmq.Frame]) -> Job | None:
        try:
            header = protocol.unpack_header(frames[0].buffer)
        except ValueError as exc:
            # Without a readable header there is no id to answer.
            print(f"torchpool worker: dropped an unreadable message: {exc}", file=sys.stderr)
            return None
        request_id = header.get("id")
        if header["t"] in streaming.STREAM_CONTROL:
            return None  # for a stream that has already ended
        if header["t"] != protocol.REQUEST or not isinstance(request_id, int):
            print(f"torchpool worker: dropped a {header['t']!r} message", file=sys.stderr)
            return None
        fmt = str(header.get("fmt", protocol.FMT_JSON))
        arrived = time.monotonic()
        queued = header.get("queued")
        self._pacer.gateway_queued = queued if isinstance(queued, int) else 0
        deadline = deadline_of(header, arrived)
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the request's deadline passed before it was read")
            if len(frames) < 2:
                raise RequestError("the request has no body")
            format_codec = self._codecs.get(fmt)
            if format_codec is None:
                raise RequestError(f"unknown body format {fmt!r}")
            inputs, context = format_codec.decode(header, frames[1].buffer)
        except TorchpoolError as err:
            self._reply_error(request_id, err)
            return None
        except Exception as exc:
            self._reply_error(request_id, _internal("decoding the request", exc))
            return None
        job = Job(request_id, fmt, inputs, deadline, context, arrived)
        if self._streams is not None:
            self._streams.admitted(job, header)
        return job

    # --- compute and reply --------------------------------------------------------

    def _run(self, jobs: list[Job], threads: int) -> None:
        now = time.monotonic()
        live: list[Job] = []
        for job in jobs:
            if job.deadline is not None and now > job.deadline:
                self._reply_error(job.request_id, DeadlineExceeded("the request's deadline passed"))
            else:
                live.append(job)
        assembly = self._model.assembly
        for grouped in batching.group(live, assembly):
            rows = sum(job.rows for job in grouped)
            self._state.count_batch(rows)
            self._state.count_threads(threads)
            started = time.monotonic()
            for job in grouped:
                self._state.waits.observe(started - job.arrived)
            try:
                inputs = [job.inputs for job in grouped]
                results = batching.run_group(self._model.run, inputs, assembly)
            except Exception as exc:
                results = [_internal("running the batch", exc)] * len(grouped)
            took = time.monotonic() - started
            self._pacer.observe_forward(took)
            self._sizer.observe(threads, rows, took)
            for job, result in zip(grouped, results, strict=True):
                self._finish(job, result)

    def _finish(self, job: Job, result: Any) -> None:
        try:
            if isinstance(result, TorchpoolError):
                raise result
            if self._model.postprocess is not None:
                try:
                    result = self._model.postprocess(result)
                except Exception as exc:
                    raise model_failure(exc) from exc
            body, fmt, reply_fields = self._codecs[job.fmt].encode(job.context, result)
        except TorchpoolError as err:
            self._reply_error(job.request_id, err)
        except Exception as exc:
            self._reply_error(job.request_id, _internal("encoding the reply", exc))
        else:
            header = {
                "t": protocol.REPLY,
                "id": job.request_id,
                "code": protocol.OK,
                "fmt": fmt,
                **reply_fields,
            }
            self._send([protocol.pack(header), body])

    def _reply_error(self, request_id: int, err: TorchpoolError) -> None:
        header = {
            "t": protocol.REPLY,
            "id": request_id,
            "code": err.code,
            "message": err.message,
            "details": err.details,
        }
        self._send([protocol.pack(header)])

    def _send(self, frames: list[bytes]) -> None:
        try:
            copy = len(frames[-1]) < protocol.ZERO_COPY_BYTES
            for frame in frames[:-1]:
                # Once a message's first frame is taken, zmq takes the rest.
                self._data.send(frame, _NOBLOCK_MORE, copy=copy)
            self._data.send(frames[-1], _NOBLOCK, copy=copy)
        except zmq.Again:
            # The gateway is not taking replies (gone, or flooded past the
            # high-water mark): it settles this request by its deadline.
            print("torchpool worker: a reply was dropped: gateway not reachable", file=sys.stderr)


class _Pollable(Protocol):
    def poll(self, timeout: int | None = ..., flags: int = ...) -> int: ...


def await_message(
    sock: _Pollable, give_up: float, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Whether a message is waiting on ``sock`` by ``give_up`` (a ``clock()`` time).

    zmq's poll counts whole milliseconds, and the pacer's patience on a small
    model is tens of microseconds: rounding it up to 1 ms made such batches
    wait 20-40 times longer than the pacer allowed. A wait of a millisecond or
    more sleeps in poll (to the nearest millisecond); a shorter one polls
    without sleeping, no longer than the pacer's bound of one forward pass
    shared by the requests held.
    """
    left = give_up - clock()
    if left >= 0.001:
        return bool(sock.poll(round(left * 1000)))
    while left > 0:
        if sock.poll(0):
            return True
        left = give_up - clock()
    return False


def codecs(model: LoadedModel, max_body_bytes: int) -> dict[str, Codec]:
    """The codec of each wire format (``fmt``), all reading requests for ``model``."""
    spec = InputSpec(
        tensors.torch_dtype(model.input_dtype),
        model.input_shape,
        max_body_bytes,
        model.preprocess,
        model.dtype_asked,
        model.accepts,
    )
    v2 = v2codec.V2Codec(spec)
    return {
        protocol.FMT_JSON: codec.JsonCodec(spec),
        protocol.FMT_MSGPACK: codec.MsgpackCodec(spec),
        protocol.FMT_RAW: rawbody.RawCodec(spec),
        protocol.FMT_V2_JSON: v2,
        protocol.FMT_V2_BINARY: v2,
        protocol.FMT_GENERATE: streaming.GenerateCodec(spec),
        **openai_codecs(spec, model),
    }


def openai_codecs(spec: InputSpec, model: LoadedModel) -> dict[str, Codec]:
    """The OpenAI API's formats (see :mod:`worker.codec.openai`)."""
    streams = model.stream is not None
    text = [
        (protocol.FMT_OPENAI_CHAT, openaicodec.TextCodec(spec, "chat", model.handler, streams)),
        (
            protocol.FMT_OPENAI_COMPLETIONS,
            openaicodec.TextCodec(spec, "completions", model.handler, streams),
        ),
    ]
    return {
        protocol.FMT_OPENAI_EMBEDDINGS: openaicodec.EmbeddingsCodec(spec, streams),
        **dict(text),
    }


def deadline_of(header: dict[str, Any], arrived: float) -> float | None:
    """The ``time.monotonic()`` past which the gateway no longer wants the answer.

    The REQUEST carries ``timeout_ms``, the time it had left when sent, counted
    here from its arrival: no two machines' clocks need to agree. None (no
    deadline) when the header has none.
    """
    timeout_ms = header.get("timeout_ms")
    if not isinstance(timeout_ms, int | float) or isinstance(timeout_ms, bool):
        return None
    return arrived + timeout_ms / 1000


def _internal(doing: str, exc: Exception) -> TorchpoolError:
    return TorchpoolError(f"internal error {doing}: {type(exc).__name__}: {exc}")
