"""``inference.GRPCInferenceService``: KServe's RPCs and Triton's, on the HTTP side's rules.

Every call goes through the same runtime as REST: the model's dispatcher (its
queue, credit, deadline and retries after a worker's death), the readiness
rule of /v2/health/ready, the API keys of --api-key (``authorization: Bearer
KEY`` metadata) on the model calls, the admin token on the repository calls.
A call's gRPC deadline shortens the request's deadline as ``X-Request-Timeout``
does. While the server drains, a new call gets UNAVAILABLE ("the server is
shutting down"); ServerLive still answers.

ModelStreamInfer handles the requests of a stream one after the other. For a
model whose handler streams, each output is one response, sent as soon as it
is made, with Triton's ``triton_final_response`` parameter false, and, when
the request asked with ``triton_enable_empty_final_response`` (tritonclient's
``enable_empty_final_response=True``), an empty last response with it true. A
model that does not stream answers each request with one response, marked
final. An error is a response with ``error_message``, and the stream goes on.
When the client cancels, the worker is told at once (CANCEL) and closes the
generator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import json_format

from gateway.api import triton, v2
from gateway.api.admin import admin_check
from gateway.api.auth import parse_tokens, require_api_key
from gateway.api.grpc import convert
from gateway.api.grpc.generated import grpc_predict_v2_pb2 as pb
from gateway.api.grpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.api.grpc.status import Unimplemented, status_code
from gateway.api.http import server_not_ready_reason
from gateway.api.metrics import Metrics
from gateway.api.sse import model_streams
from gateway.api.stats import model_statistics
from gateway.pool import streams
from gateway.pool.model import ModelRuntime, not_ready_reason
from gateway.pool.runtime import Runtime
from gateway.pool.streams import StreamPending
from shared import protocol
from shared.errors import SHUTTING_DOWN, RequestError, TorchpoolError, Unavailable

SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")


@dataclass(slots=True)
class _Call:
    """What a call's bookkeeping learns while it runs: its model, for the metrics."""

    model: str = ""


def _metadata(context: Context, key: str) -> bytes | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value.encode() if isinstance(value, str) else bytes(value)
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service, on one gateway's runtime and metrics."""

    def __init__(self, runtime: Runtime, metrics: Metrics, version: str) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._version = version
        server = runtime.config.server
        self._keys = parse_tokens(server.api_key)
        self._admin_token = server.admin_token
        self._extensions = triton.extensions(server.admin_token)

    # --- bookkeeping ---------------------------------------------------------------

    async def _run(
        self,
        context: Context,
        method: str,
        work: Callable[[_Call], Awaitable[R]],
        *,
        key: bool = False,
        admin: bool = False,
    ) -> R:
        """``work`` after the call's checks (draining, API key, admin token), its errors
        as statuses, and its metrics recorded after."""
        call = _Call()
        started = time.perf_counter()
        code = "OK"
        try:
            if self._runtime.draining and method != "ServerLive":
                raise Unavailable(SHUTTING_DOWN)
            if key:
                self._check_key(context)
            if admin:
                self._check_admin(context)
            return await work(call)
        except TorchpoolError as exc:
            status = status_code(exc)
            code = status.name
            await context.abort(status, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"  # what grpc answers for an exception it did not expect
            raise
        finally:
            seconds = time.perf_counter() - started
            inference = method == "ModelInfer"
            self._metrics.observe_grpc(method, code, seconds, call.model, inference)

    def _check_key(self, context: Context) -> None:
        if self._keys:
            require_api_key(_metadata(context, "authorization"), self._keys)

    def _check_admin(self, context: Context) -> None:
        if not self._admin_token:
            raise Unimplemented(
                "the model repository extension is off: start the server with --admin-token"
            )
        admin_check(self._admin_token, _metadata(context, "authorization"))

    def _model(self, call: _Call, name: str, version: str) -> ModelRuntime:
        """The model a call names (NOT_FOUND if none), noted for the call's metrics."""
        model = v2.check_model(self._runtime, name, version or None)
        call.model = model.name
        return model

    # --- server and model metadata ---------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        async def work(call: _Call) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._run(context, "ServerLive", work)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        async def work(call: _Call) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=server_not_ready_reason(self._runtime) is None)

        return await self._run(context, "ServerReady", work)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        async def work(call: _Call) -> pb.ModelReadyResponse:
            model = self._model(call, request.name, request.version)
            return pb.ModelReadyResponse(ready=not_ready_reason(model.pool, 1) is None)

        return await self._run(context, "ModelReady", work, key=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        async def work(call: _Call) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name="torchpool", version=self._version, extensions=self._extensions
            )

        return await self._run(context, "ServerMetadata", work)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def work(call: _Call) -> pb.ModelMetadataResponse:
            model = self._model(call, request.name, request.version)
            signature = v2.model_signature(model, model.name)
            response = pb.ModelMetadataResponse(
                name=model.name, versions=[v2.VERSION], platform=signature["platform"]
            )
            for spec in signature["inputs"]:
                response.inputs.add(
                    name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
                )
            for spec in signature["outputs"]:
                response.outputs.add(
                    name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
                )
            return response

        return await self._run(context, "ModelMetadata", work, key=True)

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        async def work(call: _Call) -> pb.ModelInferResponse:
            model = self._model(call, request.model_name, request.model_version)
            return await self._infer(model, request, context)

        return await self._run(context, "ModelInfer", work, key=True)

    async def _infer(
        self,
        model: ModelRuntime,
        request: pb.ModelInferRequest,
        context: Context,
    ) -> pb.ModelInferResponse:
        body, json_len = convert.infer_body(request, model.settings.max_body_bytes)
        extra: protocol.RequestExtras = {
            "model": model.name,
            "version": v2.VERSION,
            "json_len": json_len,
        }
        dispatcher = model.dispatcher
        pending = dispatcher.enqueue(protocol.FMT_V2_BINARY, body, context.time_remaining(), extra)
        reply = await dispatcher.result(pending)  # cancelled: dropped from the queue if there
        reply_len = reply.fields.get("json_len")
        binary = reply.fmt == protocol.FMT_V2_BINARY and isinstance(reply_len, int)
        return convert.infer_response(reply.body, reply_len if binary else None)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: Context,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:  # refused before its first request: draining, or no valid key
            if self._runtime.draining:
                raise Unavailable(SHUTTING_DOWN)
            self._check_key(context)
        except TorchpoolError as exc:
            status = status_code(exc)
            self._metrics.observe_grpc("ModelStreamInfer", status.name, 0.0)
            await context.abort(status, exc.message)
        async for request in request_iterator:
            started = time.perf_counter()
            code, name = "OK", ""
            try:
                if self._runtime.draining:
                    raise Unavailable(SHUTTING_DOWN)
                call = _Call()
                model = self._model(call, request.model_name, request.model_version)
                name = model.name
                if model_streams(model.pool):
                    async for response in self._stream(model, request, context):
                        yield response
                else:
                    answer = await self._infer(model, request, context)
                    answer.parameters[convert.FINAL].bool_param = True
                    yield pb.ModelStreamInferResponse(infer_response=answer)
            except TorchpoolError as exc:
                code = status_code(exc).name
                yield pb.ModelStreamInferResponse(
                    error_message=exc.message, infer_response=pb.ModelInferResponse(id=request.id)
                )
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                seconds = time.perf_counter() - started
                self._metrics.observe_grpc("ModelStreamInfer", code, seconds, name, True)

    async def _stream(
        self,
        model: ModelRuntime,
        request: pb.ModelInferRequest,
        context: Context,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request to a streaming model: a response per output as it comes (see
        :func:`gateway.api.sse.write_stream`, which does the same for HTTP)."""
        empty_final = convert.parameter_value(
            request.parameters.get(convert.EMPTY_FINAL, pb.InferParameter())
        )
        extra: protocol.RequestExtras = {
            "model": model.name,
            "version": v2.VERSION,
            "stream": True,
            "credit": streams.CREDIT,
        }
        body = convert.generate_body(request)
        dispatcher = model.dispatcher
        pending = dispatcher.enqueue(
            protocol.FMT_GENERATE, body, context.time_remaining(), extra, kind=StreamPending
        )
        assert isinstance(pending, StreamPending)
        done = asyncio.ensure_future(dispatcher.result(pending))
        loop = asyncio.get_running_loop()
        try:
            while True:
                written = 0
                while pending.chunks:
                    answer = convert.chunk_response(pending.chunks.popleft(), request.id)
                    yield pb.ModelStreamInferResponse(infer_response=answer)
                    written += 1
                if written:
                    streams.grant(model.pool, model.transport, pending, written)
                if done.done() and not pending.chunks:
                    break
                pending.arrived = loop.create_future()
                waiting: set[asyncio.Future[Any]] = {pending.arrived, done}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            done.result()  # the stream's error, if it ended in one
            if empty_final is True:
                yield pb.ModelStreamInferResponse(infer_response=convert.final_response(request.id))
        finally:
            # Out of the queue now: a worker freed before ``done`` runs its
            # cancellation would otherwise take a stream nobody reads.
            dispatcher.drop(pending)
            done.cancel()
            # Still on a worker (the client cancelled, the deadline passed): stop it there.
            streams.cancel(model.pool, model.transport, dispatcher, pending)

    # --- Triton's extensions ----------------------------------------------------------

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        async def work(call: _Call) -> pb.ModelStatisticsResponse:
            if request.name:
                models = [self._model(call, request.name, request.version)]
            else:
                models = list(self._runtime.models.values())
            document = {
                "model_stats": [model_statistics(self._metrics, m, v2.VERSION) for m in models]
            }
            return json_format.ParseDict(document, pb.ModelStatisticsResponse())

        return await self._run(context, "ModelStatistics", work, key=True)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        async def work(call: _Call) -> pb.RepositoryIndexResponse:
            response = pb.RepositoryIndexResponse()
            for model in self._runtime.models.values():
                state = v2.REPOSITORY_STATES[model.state]
                if request.ready and state != "READY":
                    continue
                response.models.add(
                    name=model.name, version=v2.VERSION, state=state, reason=model.error or ""
                )
            return response

        return await self._run(context, "RepositoryIndex", work)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        async def work(call: _Call) -> pb.RepositoryModelLoadResponse:
            call.model = request.model_name
            parameters = request.parameters
            if any(key.startswith("file:") for key in parameters):
                raise RequestError(triton.NO_FILES)
            config = parameters["config"].string_param if "config" in parameters else None
            await triton.load(self._runtime, request.model_name, config)
            return pb.RepositoryModelLoadResponse()

        return await self._run(context, "RepositoryModelLoad", work, admin=True)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        async def work(call: _Call) -> pb.RepositoryModelUnloadResponse:
            call.model = request.model_name
            await triton.unload(self._runtime, request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._run(context, "RepositoryModelUnload", work, admin=True)
