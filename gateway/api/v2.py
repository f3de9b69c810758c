"""The Open Inference Protocol (KServe v2) over REST, so stock Triton and KServe clients work.

    GET  /v2                                         server metadata
    GET  /v2/health/live   /v2/health/ready          probes (ready: the /health/ready rule)
    GET  /v2/models/{name}[/versions/{v}]            model metadata: inputs, outputs
    GET  /v2/models/{name}[/versions/{v}]/ready      200 when a worker serves it, else 503
    GET  /v2/models/{name}[/versions/{v}]/config     Triton's model configuration, the gist
    POST /v2/models/{name}[/versions/{v}]/infer      inference, JSON or binary tensor data
    POST /v2/repository/index                        every model and its state (Triton)

Every served model under its name (one model alone: ``--model-name``,
default the file's stem, or ``demo``), at version ``1``. As with /predict,
the gateway never looks inside tensors: an infer body goes to a worker as it
came, ``v2json``, or ``v2binary`` with the ``Inference-Header-Content-Length``
(the binary tensor extension), and the worker's answer comes back as it was made
(see :mod:`worker.codec.v2`).

Every error on these routes is ``{"error": "<message>"}``, with the status
:func:`shared.errors.v2_status` gives: 400 bad input, 404 unknown model or
version, 413 too large, 503 unavailable (with Retry-After), 500 model failure,
504 past the deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from gateway.api import http
from gateway.api.http import (
    TIMEOUT_HEADER,
    V2_ERROR_SCHEMA,
    json_response,
    read_body,
    run_request,
    runtime_of,
    server_not_ready_reason,
    timeout_header,
    v2_error_response,
)
from gateway.pool.model import ModelRuntime, ModelState, not_ready_reason
from gateway.pool.runtime import Runtime
from gateway.pool.workers import Pool, WorkerRecord
from shared import protocol
from shared.errors import ModelNotFound, RequestError, TorchpoolError, Unavailable
from shared.media import OCTET_STREAM, content_encoding

VERSION: Final = protocol.MODEL_VERSION
INFER: Final = "/infer"  # the inference route's last step, after /models/{name}[/versions/{v}]
INPUT_NAME: Final = "input__0"
HEADER_LENGTH: Final = "inference-header-content-length"
EXTENSIONS: Final = ["binary_tensor_data"]
# Triton's platform names by how the model was loaded; everything else is "pytorch".
_PLATFORMS: Final = {"torchscript": "pytorch_libtorch"}


class V2Route(APIRoute):
    """A route whose TorchpoolErrors become the protocol's ``{"error": ...}`` answers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except TorchpoolError as exc:
                return v2_error_response(exc)

        return guarded


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], route_class=V2Route)


def errors_openapi(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a /v2 route answers (``{"error"}`` bodies)."""
    return http.errors_openapi(*statuses, schema=V2_ERROR_SCHEMA)


def check_model(runtime: Runtime, name: str, version: str | None) -> ModelRuntime:
    """The model served as ``name``; 404 for an unknown name or version."""
    model = runtime.model(name)
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {VERSION!r}")
    return model


# --- server -------------------------------------------------------------------


@router.get("")
async def server_metadata(request: Request) -> Response:
    """Server name, version and the protocol extensions it serves (see gateway.api.triton)."""
    extensions = getattr(request.app.state, "extensions", EXTENSIONS)
    return json_response(
        {"name": "torchpool", "version": request.app.version, "extensions": extensions}
    )


@router.get("/health/live")
async def server_live() -> Response:
    """200 while the gateway process runs."""
    return json_response({"live": True})


@router.get(
    "/health/ready",
    responses=errors_openapi(503),
)
async def server_ready(request: Request) -> Response:
    """200 when every model has its own min_ready workers ready (--min-ready, or its
    table's ``min_ready``) and the server is not draining: the /health/ready rule."""
    reason = server_not_ready_reason(runtime_of(request))
    if reason is not None:
        return json_response({"error": reason, "ready": False}, 503)
    return json_response({"ready": True})


# --- repository (Triton's model repository extension) --------------------------

REPOSITORY_STATES: Final = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADING: "UNLOADING",
}


@router.post("/repository/index")
async def repository_index(request: Request) -> Response:
    """Every served model with its version, state and, when it is not ready, why."""
    index = []
    for model in runtime_of(request).models.values():
        entry = {"name": model.name, "version": VERSION, "state": REPOSITORY_STATES[model.state]}
        if model.error is not None:
            entry["reason"] = model.error
        index.append(entry)
    return json_response(index)


# --- model --------------------------------------------------------------------


def _described(pool: Pool) -> WorkerRecord | None:
    """A worker that has loaded the model and said what it takes (ready ones first)."""
    loaded = [w for w in pool.serving() if w.input_dtype is not None]
    loaded.sort(key=lambda w: not w.ready)
    return loaded[0] if loaded else None


def model_signature(model: ModelRuntime, name: str) -> dict[str, Any]:
    """The model's inputs and outputs as its workers reported them at READY."""
    worker = _described(model.pool)
    if worker is None:
        raise Unavailable(f"model {name!r} is not loaded yet: no worker has loaded it")
    row = worker.input_shape
    dtype = worker.input_dtype or "float32"
    signature = worker.signature or {}
    outputs = signature.get("outputs") or []
    return {
        "platform": _PLATFORMS.get(str(signature.get("source")), "pytorch"),
        # Dimension 0 is the batch; a row shape nobody declared is one variable dimension.
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": protocol.V2_NAMES.get(dtype, dtype.upper()),
                "shape": [-1, *row] if row is not None else [-1],
            }
        ],
        "outputs": [
            {
                "name": output["name"],
                "datatype": protocol.V2_NAMES.get(output["dtype"], str(output["dtype"]).upper()),
                "shape": output["shape"],
            }
            for output in outputs
        ],
    }


async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    """Name, versions, platform, and the inputs and outputs with -1 for variable dims."""
    model = check_model(runtime_of(request), name, version)
    signature = model_signature(model, name)
    return json_response(
        {
            "name": name,
            "versions": [VERSION],
            "platform": signature["platform"],
            "inputs": signature["inputs"],
            "outputs": signature["outputs"],
        }
    )


async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    """200 while at least one worker serves the model, else 503."""
    model = check_model(runtime_of(request), name, version)
    if not_ready_reason(model.pool, 1) is not None:
        message = f"model {name!r} is not ready: no worker serves it now"
        return json_response({"error": message, "name": name, "ready": False}, 503)
    return json_response({"name": name, "ready": True})


async def model_config(request: Request, name: str, version: str | None = None) -> Response:
    """The parts of a Triton model configuration that describe this model."""
    model = check_model(runtime_of(request), name, version)
    settings = model.settings
    signature = model_signature(model, name)

    def tensors(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"name": s["name"], "data_type": f"TYPE_{s['datatype']}", "dims": s["shape"][1:]}
            for s in specs
        ]

    return json_response(
        {
            "name": name,
            "platform": signature["platform"],
            "backend": "pytorch",
            "max_batch_size": settings.max_batch_size,
            "input": tensors(signature["inputs"]),
            "output": tensors(signature["outputs"]),
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(settings.max_batch_delay_ms * 1000)
            },
        }
    )


async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Run the model on a v2 inference request; the worker parses and answers it."""
    model = check_model(runtime_of(request), name, version)
    settings = model.settings
    fields: protocol.RequestExtras = {"model": name, "version": VERSION}
    encoding = content_encoding(request.headers.get("content-encoding"))
    if encoding is not None:
        fields["encoding"] = encoding
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) == 0:
            raise RequestError(
                f"Inference-Header-Content-Length must be a positive byte count, "
                f"got {header_length!r}"
            )
        fields["json_len"] = int(header_length)
    timeout_s = timeout_header(request.headers.get(TIMEOUT_HEADER))
    body = await read_body(
        request.receive,
        request.headers.get("content-length"),
        settings.max_body_bytes,
        'empty body; send an inference request {"inputs": [...]}',
    )
    if "json_len" in fields and "encoding" not in fields and fields["json_len"] > len(body):
        raise RequestError(
            f"Inference-Header-Content-Length {fields['json_len']} exceeds the body of "
            f"{len(body)} bytes"
        )
    fmt = protocol.FMT_V2_BINARY if "json_len" in fields else protocol.FMT_V2_JSON
    reply = await run_request(request.receive, model.dispatcher, fmt, body, timeout_s, fields)
    json_len = reply.fields.get("json_len")
    if reply.fmt == protocol.FMT_V2_BINARY and isinstance(json_len, int):
        return Response(
            reply.body,
            media_type=OCTET_STREAM,
            headers={"Inference-Header-Content-Length": str(json_len)},
        )
    return Response(reply.body, media_type="application/json")


INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "description": "One tensor: {name, shape, datatype, data}",
                            "items": {"type": "object"},
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            OCTET_STREAM: {
                "schema": {
                    "description": "Binary tensor extension: Inference-Header-Content-Length "
                    "bytes of JSON request, then the inputs' raw little-endian bytes",
                    "type": "string",
                    "format": "binary",
                }
            },
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs: JSON, or with binary outputs the binary tensor extension",
        "content": {"application/json": {"schema": {}}, OCTET_STREAM: {"schema": {}}},
    },
    **errors_openapi(400, 404, 413, 500, 503, 504),
}

# Each model route also under /versions/{version}, as the protocol has it.
for _suffix, _endpoint, _method, _openapi, _responses in (
    ("", model_metadata, "GET", None, errors_openapi(404, 503)),
    ("/ready", model_ready, "GET", None, errors_openapi(404, 503)),
    ("/config", model_config, "GET", None, errors_openapi(404, 503)),
    (INFER, infer, "POST", INFER_OPENAPI, _INFER_RESPONSES),
):
    for _base in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(
            _base + _suffix,
            _endpoint,
            methods=[_method],
            openapi_extra=_openapi,
            responses=_responses,
        )


def install(app: FastAPI) -> None:
    """Serve the /v2 routes on ``app``."""
    app.include_router(router)
