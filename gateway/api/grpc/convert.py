"""Protobuf messages to the worker's wire formats and back, without looking into tensors.

A ``ModelInferRequest`` becomes the same ``v2binary`` request the REST side
sends for a binary body (see :mod:`worker.codec.v2`), so the worker needs no
change: a JSON header naming each input with its ``binary_data_size``, then the
inputs' raw bytes, and ``binary_data_output`` so every output comes back raw.

    ModelInferRequest                         v2binary body
      inputs[i]  name, datatype, shape   ->   {"inputs": [{name, datatype, shape,
      raw_input_contents[i]                      parameters: {binary_data_size}}],
        (or contents, packed here)             "outputs": [...], "parameters":
                                               {..., binary_data_output: true}}
                                              + raw bytes, input after input

    v2binary reply  JSON head + raw bytes ->  ModelInferResponse outputs + raw_output_contents

Typed ``contents`` are packed into the same raw little-endian bytes (one C-level
pass through :mod:`array`), BYTES elements with their 4-byte length prefixes.
A streaming model is asked with Triton's generate body instead
(``{"<input>": value, "parameters": {...}}``), and each JSON chunk it sends
becomes one ``ModelInferResponse``: strings as BYTES, integers INT64, other
numbers FP64, booleans BOOL, nested lists with their shape.
"""

from __future__ import annotations

import array
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from gateway.api.grpc.generated import grpc_predict_v2_pb2 as pb
from shared import protocol
from shared.errors import ModelFailure, PayloadTooLarge, RequestError

BYTES: Final = "BYTES"
# Triton's parameter on every response of a stream; true on the last one.
FINAL: Final = "triton_final_response"
EMPTY_FINAL: Final = "triton_enable_empty_final_response"
# The typed field and array typecode (little-endian on every platform torchpool runs on,
# checked below) of each datatype that has one; FP16 and BF16 travel raw only.
_TYPED: Final[Mapping[str, tuple[str, str]]] = {
    "BOOL": ("bool_contents", "B"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "UINT8": ("uint_contents", "B"),
    "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"),
    "UINT64": ("uint64_contents", "Q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
}
_BIG_ENDIAN: Final = sys.byteorder == "big"


# --- parameters ----------------------------------------------------------------


def parameter_value(parameter: pb.InferParameter) -> Any:
    """An ``InferParameter`` as the JSON value the REST side would carry."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters_json(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def _refuse_shared_memory(parameters: Mapping[str, Any], what: str) -> None:
    if any(key.startswith("shared_memory") for key in parameters):
        raise RequestError(f"{what}: shared memory is not supported; send the data in the request")


# --- requests ------------------------------------------------------------------


def infer_body(request: pb.ModelInferRequest, max_bytes: int) -> tuple[bytes, int]:
    """The ``v2binary`` body of ``request`` and its JSON header's length."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs"
        )
    inputs: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for i, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        parameters = parameters_json(tensor.parameters)
        _refuse_shared_memory(parameters, what)
        if raws:
            if tensor.HasField("contents"):
                raise RequestError(f"{what} has contents and raw_input_contents: send one")
            data = raws[i]
        else:
            data = pack_contents(tensor.name, tensor.datatype, tensor.contents)
        parameters["binary_data_size"] = len(data)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": parameters,
            }
        )
        buffers.append(data)
    outputs = []
    for output in request.outputs:
        output_parameters = parameters_json(output.parameters)
        _refuse_shared_memory(output_parameters, f"output {output.name!r}")
        outputs.append(
            {"name": output.name, "parameters": {**output_parameters, "binary_data": True}}
        )
    document: dict[str, Any] = {
        "inputs": inputs,
        "parameters": {**parameters_json(request.parameters), "binary_data_output": True},
    }
    if request.id:
        document["id"] = request.id
    if outputs:
        document["outputs"] = outputs
    head = orjson.dumps(document)
    size = len(head) + sum(len(b) for b in buffers)
    if size > max_bytes:
        raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {max_bytes}")
    return b"".join([head, *buffers]), len(head)


def pack_contents(name: str, datatype: str, contents: pb.InferTensorContents) -> bytes:
    """Typed ``contents`` as the raw bytes ``raw_input_contents`` would carry."""
    if datatype == BYTES:
        return protocol.join_bytes(contents.bytes_contents)
    typed = _TYPED.get(datatype)
    if typed is None:
        if datatype in protocol.V2_DATATYPES:  # FP16, BF16: no typed field holds them
            raise RequestError(
                f"input {name!r}: {datatype} has no typed contents; send raw_input_contents"
            )
        raise RequestError(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of "
            f"{', '.join([*protocol.V2_DATATYPES, BYTES])}"
        )
    field, typecode = typed
    values: Iterable[Any] = getattr(contents, field)
    try:
        packed = array.array(typecode, values)
    except OverflowError as exc:
        raise RequestError(f"input {name!r}: a value does not fit {datatype}") from exc
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def generate_body(request: pb.ModelInferRequest) -> bytes:
    """A streaming model's request: Triton's generate body of the one input and parameters.

    A BYTES input of one element is a string (``text_input`` as tritonclient
    sends it), more elements a nested list; a numeric input is a nested list.
    """
    if len(request.inputs) != 1:
        names = ", ".join(t.name for t in request.inputs) or "none"
        raise RequestError(
            f"the model takes one input tensor; the request has {len(request.inputs)}: {names}"
        )
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise RequestError(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
            )
        raw = request.raw_input_contents[0]
    else:
        raw = pack_contents(tensor.name, tensor.datatype, tensor.contents)
    shape = list(tensor.shape)
    value = _unpack(tensor.name, tensor.datatype, shape, raw)
    document = {tensor.name: value, "parameters": parameters_json(request.parameters)}
    document["parameters"].pop(EMPTY_FINAL, None)
    return orjson.dumps(document)


def _unpack(name: str, datatype: str, shape: list[int], raw: bytes) -> Any:
    """Raw tensor bytes as JSON values (a generate body is small: a prompt, a few numbers)."""
    if any(dim < 0 for dim in shape):
        raise RequestError(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype == BYTES:
        try:
            items: list[Any] = [item.decode() for item in protocol.split_bytes(name, raw)]
        except UnicodeDecodeError as exc:
            raise RequestError(f"input {name!r}: a BYTES element is not UTF-8") from exc
        if len(items) == 1:
            return items[0]
        return _nest(name, items, shape)
    typed = _TYPED.get(datatype)
    if typed is None:
        raise RequestError(
            f"input {name!r}: datatype {datatype!r} cannot go to a streaming model; "
            f"send one of {', '.join([*_TYPED, BYTES])}"
        )
    values = array.array(typed[1])
    if len(raw) % values.itemsize:
        raise RequestError(f"input {name!r}: {len(raw)} bytes is no whole number of {datatype}")
    values.frombytes(raw)
    if _BIG_ENDIAN:
        values.byteswap()
    flat: list[Any] = [bool(v) for v in values] if datatype == "BOOL" else values.tolist()
    return _nest(name, flat, shape)


def _nest(name: str, flat: list[Any], shape: list[int]) -> Any:
    if len(flat) != math.prod(shape):
        raise RequestError(
            f"input {name!r}: shape {shape} needs {math.prod(shape)} values, data holds {len(flat)}"
        )
    nested: list[Any] = flat
    for dim in reversed(shape[1:]):
        nested = [nested[i : i + dim] for i in range(0, len(nested), dim)] if dim else []
    return nested


# --- responses -----------------------------------------------------------------


def infer_response(body: bytes, json_len: int | None) -> pb.ModelInferResponse:
    """A worker's v2 reply (``v2binary``, or ``v2json``) as a ``ModelInferResponse``."""
    view = memoryview(body)
    head = view[:json_len] if json_len is not None else view
    try:
        document = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ModelFailure(f"the worker's answer is not a v2 response: {exc}") from exc
    response = pb.ModelInferResponse(
        model_name=str(document.get("model_name", "")),
        model_version=str(document.get("model_version", "")),
        id=str(document.get("id", "")),
    )
    offset = json_len or 0
    raws: list[bytes] = []
    for output in document.get("outputs", []):
        datatype = str(output["datatype"])
        response.outputs.add(name=output["name"], datatype=datatype, shape=output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if isinstance(size, int):
            raws.append(bytes(view[offset : offset + size]))
            offset += size
        else:
            raws.append(_pack_json(datatype, output.get("data", [])))
    response.raw_output_contents.extend(raws)
    return response


def _pack_json(datatype: str, data: Sequence[Any]) -> bytes:
    if datatype == BYTES:
        items = [str(v).encode() if not isinstance(v, bytes) else v for v in data]
        return protocol.join_bytes(items)
    typed = _TYPED.get(datatype)
    if typed is None:
        raise ModelFailure(f"an output of datatype {datatype} came back as JSON")
    packed = array.array(typed[1], data)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def chunk_response(chunk: bytes, request_id: str) -> pb.ModelInferResponse:
    """One output of a stream (a generate document) as a ``ModelInferResponse``."""
    try:
        document = orjson.loads(chunk)
    except orjson.JSONDecodeError as exc:
        raise ModelFailure(f"the worker sent a chunk that is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        document = {"output__0": document}
    response = pb.ModelInferResponse(
        model_name=str(document.pop("model_name", "")),
        model_version=str(document.pop("model_version", "")),
        id=request_id,
    )
    for name, value in document.items():
        datatype, shape, flat = _describe(value)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(_pack_json(datatype, flat))
    response.parameters[FINAL].bool_param = False
    return response


def _describe(value: Any) -> tuple[str, list[int], list[Any]]:
    """A JSON value's datatype, shape (a scalar is ``[1]``) and flat elements."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat = _flatten(value) if shape else [value]
    if not shape:
        shape = [1]
    if all(isinstance(v, str) for v in flat):
        return BYTES, shape, flat
    if all(isinstance(v, bool) for v in flat):
        return "BOOL", shape, flat
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return "INT64", shape, flat
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        return "FP64", shape, [float(v) for v in flat]
    return BYTES, shape, [orjson.dumps(v).decode() for v in flat]


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    flat: list[Any] = []
    for item in value:
        flat.extend(_flatten(item))
    return flat


def final_response(request_id: str) -> pb.ModelInferResponse:
    """The empty last response of a stream, as Triton sends it when asked to."""
    response = pb.ModelInferResponse(id=request_id)
    response.parameters[FINAL].bool_param = True
    return response
