"""Streams: a handler's ``predict_stream`` generator, one output at a time, over the wire.

A model whose handler defines ``predict_stream`` is served by a
:class:`StreamRunner` instead of the batching loop: one request at a time.
For each request it iterates the generator; each yielded value goes through
``postprocess`` (when defined) and then:

- for a REQUEST with ``stream: true``, out as a CHUNK as soon as it is made,
  while the stream has credit; out of credit, the generator is paused until
  the gateway's CREDIT comes (so a slow reader never makes the worker buffer);
- for any other REQUEST, into a list, answered by one REPLY at the end.

Between two outputs the runner reads the data socket without blocking: a
CANCEL for its stream closes the generator (its ``finally`` blocks run) and the
runner takes the next request; CREDIT adds credit; other REQUESTs are decoded
and queued for after. A stream past its deadline is closed the same way and
answered ``deadline_exceeded``; a generator that raises is answered
``model_error``. Either error REPLY ends the stream, and the worker lives on.
A stop signal, or the gateway gone, also ends it between two outputs (even
while it waits for credit): the generator is closed and the stream answered
``unavailable``. A STOP from the gateway lets it finish, as a drain does.

The wire messages are in :mod:`shared.protocol`.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import zmq

from shared import protocol
from shared.errors import (
    DeadlineExceeded,
    RequestError,
    TorchpoolError,
    Unavailable,
)
from worker import pytree
from worker.codec import jsonio
from worker.codec import v2 as v2codec
from worker.codec.inputs import Codec, InputSpec, check_body_size, prepare
from worker.codec.openai import TextContext
from worker.control import WorkerState
from worker.model.handler import positional_count
from worker.model.loading import LoadedModel
from worker.serve.batching import Job
from worker.serve.failure import model_failure

# The timeout of a request that names none (a gateway always does).
_NO_TIMEOUT_S: Final = 3600.0
# Messages for a stream; one for a stream that has ended is ignored.
STREAM_CONTROL: Final = frozenset({protocol.CANCEL, protocol.CREDIT})

Admit = Callable[[list[zmq.Frame]], "Job | None"]
Send = Callable[[list[bytes]], None]
ReplyError = Callable[[int, TorchpoolError], None]
# Why the running stream must end now (a stop signal, an orphaned worker), or None.
Interrupted = Callable[[], "str | None"]
# Sleep until the data socket or a reason to stop wakes the worker, at most this long.
Wait = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class GenerateContext:
    """A ``generate`` request's model name and version, echoed in every response, and
    its ``parameters`` for the handler."""

    model: str
    version: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Stream:
    """What the runner knows of one request from its REQUEST header."""

    stream: bool
    credit: int
    deadline: float  # time.monotonic()
    cancelled: bool = False


class GenerateCodec:
    """``fmt == "generate"``: a generate body ``{"<input>": value, "parameters": {...}}``.

    The model has one input, so the request names exactly one (``text_input``
    by Triton's convention, though any name is taken); ``parameters``, a JSON
    object, go to a ``predict_stream`` that takes them (see :func:`with_parameters`).
    The payload goes through ``preprocess`` as a JSON body's ``input_tensor`` does.
    """

    content_type: Final = "application/json"

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def decode(
        self, header: Mapping[str, Any], body: bytes | memoryview
    ) -> tuple[Any, GenerateContext]:
        check_body_size(body, self.spec.max_bytes)
        doc = jsonio.parse(body)
        if not isinstance(doc, dict):
            raise RequestError('a generate body is an object like {"text_input": "..."}')
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise RequestError(f"parameters must be a JSON object, got {parameters!r:.80}")
        names = [key for key in doc if key != "parameters"]
        if len(names) != 1:
            raise RequestError(
                f"a generate request names exactly one input (such as text_input); got {names}"
            )
        value = prepare(doc[names[0]], self.content_type, self.spec, names[0])
        context = GenerateContext(
            str(header.get("model", "")),
            str(header.get("version", protocol.MODEL_VERSION)),
            parameters,
        )
        return value, context

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        """One answer from a model that does not stream (the gateway sends it none)."""
        document = _generate_document(context, generate_fields(result))
        return jsonio.dump(document), protocol.FMT_JSON, {}


class StreamRunner:
    """Runs a streaming model's requests one at a time on the serving thread."""

    def __init__(
        self,
        data: zmq.Socket[bytes],
        model: LoadedModel,
        state: WorkerState,
        codecs: Mapping[str, Codec],
        *,
        admit: Admit,
        send: Send,
        reply_error: ReplyError,
        interrupted: Interrupted,
        wait: Wait,
    ) -> None:
        assert model.stream is not None, "StreamRunner needs a model with predict_stream"
        self._data = data
        self._model = model
        self._produce = with_parameters(model.stream)
        self._state = state
        self._codecs = codecs
        self._admit = admit
        self._send = send
        self._reply_error = reply_error
        self._interrupted = interrupted
        self._wait = wait
        self._streams: dict[int, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def admitted(self, job: Job, header: Mapping[str, Any]) -> None:
        """Note what a just-decoded REQUEST asks for: stream or not, and its credit."""
        credit = header.get("credit")
        deadline = job.deadline if job.deadline is not None else time.monotonic() + _NO_TIMEOUT_S
        self._streams[job.request_id] = _Stream(
            stream=header.get("stream") is True,
            credit=credit if isinstance(credit, int) and credit > 0 else protocol.STREAM_CREDIT,
            deadline=deadline,
        )

    def step(self, pending: deque[Job], receive: Callable[[float], Job | None]) -> None:
        """Run the next request, queued or waiting on the socket, to its end."""
        job = pending.popleft() if pending else receive(0.0)
        if job is None:
            return
        stream = self._streams.pop(job.request_id, None)
        if stream is None:
            stream = _Stream(False, protocol.STREAM_CREDIT, time.monotonic() + _NO_TIMEOUT_S)
        if isinstance(job.context, v2codec.V2Context):
            self._reply_error(
                job.request_id,
                RequestError(
                    "this model streams its outputs: use /v2/models/{name}/generate "
                    "or /generate_stream instead of /infer"
                ),
            )
            return
        self._run(job, stream, pending)

    # --- one request ---------------------------------------------------------------

    def _run(self, job: Job, stream: _Stream, pending: deque[Job]) -> None:
        inputs = pytree.to_device(job.inputs, self._model.device)
        context = job.context
        parameters = (
            context.parameters if isinstance(context, GenerateContext | TextContext) else {}
        )
        # An OpenAI request frames its own chunks, and may end early (a stop sequence).
        text = context if isinstance(context, TextContext) else None
        try:
            with torch.inference_mode():
                outputs = self._produce(inputs, parameters)
        except Exception as exc:
            self._reply_error(job.request_id, model_failure(exc))
            return
        collected: list[Any] = []
        seq = 0
        try:
            while True:
                self._poll(job.request_id, stream, pending)
                if stream.cancelled:
                    return  # the gateway has forgotten this request: nothing to answer
                if (reason := self._interrupted()) is not None:
                    self._reply_error(
                        job.request_id,
                        Unavailable(f"the worker is stopping ({reason}) after {seq} outputs"),
                    )
                    return
                if time.monotonic() > stream.deadline:
                    self._reply_error(
                        job.request_id,
                        DeadlineExceeded(f"the stream ran past its deadline after {seq} outputs"),
                    )
                    return
                try:
                    item = self._next(outputs)
                except StopIteration:
                    break
                except Exception as exc:
                    self._reply_error(job.request_id, model_failure(exc))
                    return
                try:
                    if self._model.postprocess is not None:
                        try:
                            item = self._model.postprocess(item)
                        except Exception as exc:
                            raise model_failure(exc) from exc
                    if text is not None:
                        body = text.feed(item)
                        if body is None:
                            if text.done:
                                break
                            continue
                    elif not stream.stream:
                        collected.append(item)
                        continue
                    else:
                        body = self._chunk_body(job, item)
                except TorchpoolError as err:
                    self._reply_error(job.request_id, err)
                    return
                self._send_chunk(job.request_id, seq, body)
                seq += 1
                stream.credit -= 1
                if text is not None and text.done:
                    break
        finally:
            self._close(outputs)
        try:
            if stream.stream:
                for body in text.tail() if text is not None else ():
                    self._poll(job.request_id, stream, pending)  # waits for credit
                    if stream.cancelled:
                        return
                    self._send_chunk(job.request_id, seq, body)
                    seq += 1
                    stream.credit -= 1
                self._send([protocol.pack({"t": protocol.END, "id": job.request_id})])
            else:
                self._reply_collected(job, collected)
        except TorchpoolError as err:
            self._reply_error(job.request_id, err)

    def _next(self, outputs: Any) -> Any:
        """The generator's next output, computed under inference mode; StopIteration at its end."""
        self._state.busy = True
        try:
            with torch.inference_mode():
                if inspect.isasyncgen(outputs):
                    try:
                        return self._event_loop().run_until_complete(outputs.__anext__())
                    except StopAsyncIteration:
                        raise StopIteration from None
                return next(outputs)
        finally:
            self._state.busy = False

    def _close(self, outputs: Any) -> None:
        """Close the generator so its ``finally`` blocks run now, not at garbage collection."""
        try:
            if inspect.isasyncgen(outputs):
                self._event_loop().run_until_complete(outputs.aclose())
            elif inspect.isgenerator(outputs):
                outputs.close()
        except Exception as exc:
            print(f"torchpool worker: closing a stream's generator failed: {exc}", file=sys.stderr)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    # --- the data socket between two outputs ------------------------------------------

    def _poll(self, request_id: int, stream: _Stream, pending: deque[Job]) -> None:
        """Take in what waits on the socket; out of credit, wait for some (or CANCEL, or the
        deadline)."""
        while True:
            self._read_waiting(request_id, stream, pending)
            if stream.cancelled or not stream.stream or stream.credit > 0:
                return
            left = stream.deadline - time.monotonic()
            if left <= 0 or self._interrupted() is not None:
                return
            self._wait(left)

    def _read_waiting(self, request_id: int, stream: _Stream, pending: deque[Job]) -> None:
        while True:
            try:
                frames = self._data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = protocol.unpack_header(frames[0].buffer)
            except ValueError as exc:
                print(f"torchpool worker: dropped an unreadable message: {exc}", file=sys.stderr)
                continue
            kind = header["t"]
            if kind in STREAM_CONTROL:
                if header.get("id") != request_id:
                    continue  # for a stream that has ended
                if kind == protocol.CANCEL:
                    stream.cancelled = True
                elif isinstance(n := header.get("n"), int) and n > 0:
                    stream.credit += n
            elif (job := self._admit(frames)) is not None:
                pending.append(job)

    # --- encoding ----------------------------------------------------------------------

    def _chunk_body(self, job: Job, item: Any) -> bytes:
        if isinstance(job.context, GenerateContext):
            return jsonio.dump(_generate_document(job.context, generate_fields(item)))
        return jsonio.dump({"output": jsonio.jsonable(item)})

    def _send_chunk(self, request_id: int, seq: int, body: bytes) -> None:
        header = protocol.pack({"t": protocol.CHUNK, "id": request_id, "seq": seq})
        try:
            self._data.send_multipart([header, body], zmq.NOBLOCK)
        except zmq.Again:
            print("torchpool worker: a chunk was dropped: gateway not reachable", file=sys.stderr)

    def _reply_collected(self, job: Job, outputs: list[Any]) -> None:
        reply_fields: dict[str, Any] = {}
        if isinstance(job.context, GenerateContext):
            merged = merge_fields([generate_fields(item) for item in outputs])
            body, fmt = jsonio.dump(_generate_document(job.context, merged)), protocol.FMT_JSON
        else:
            body, fmt, reply_fields = self._codecs[job.fmt].encode(job.context, outputs)
        reply = {"t": protocol.REPLY, "id": job.request_id, "code": protocol.OK, "fmt": fmt}
        self._send([protocol.pack({**reply, **reply_fields}), body])


def with_parameters(stream: Callable[..., Any]) -> Callable[[Any, dict[str, Any]], Any]:
    """A handler's ``predict_stream``, always called as ``(x, parameters)``.

    The signature is read once: two positional parameters (or ``*args``) get a
    generate request's ``parameters`` (``{}`` when it has none, and on
    ``/predict``); one gets ``x`` alone.
    """
    if positional_count(stream) >= 2:
        return stream
    return lambda x, parameters: stream(x)


def _generate_document(context: GenerateContext, fields: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": context.model, "model_version": context.version, **fields}


def generate_fields(item: Any) -> dict[str, Any]:
    """One output as generate response fields: a dict's own keys, a string as
    ``text_output`` (Triton's name for generated text), anything else as ``output__0``."""
    if isinstance(item, Mapping):
        return {str(key): jsonio.jsonable(value) for key, value in item.items()}
    if isinstance(item, str):
        return {"text_output": item}
    return {"output__0": jsonio.jsonable(item)}


def merge_fields(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Every output of a generate request in one response: strings joined, others listed."""
    merged: dict[str, list[Any]] = {}
    for fields in items:
        for key, value in fields.items():
            merged.setdefault(key, []).append(value)
    return {
        key: "".join(values) if all(isinstance(v, str) for v in values) else values
        for key, values in merged.items()
    }
