"""Open Inference Protocol (KServe v2) bodies: ``/infer`` requests to tensors, results back.

The gateway passes the HTTP body through untouched (see :mod:`shared.protocol`):

- ``v2json``: the body is the JSON inference request
  ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"}],
  "outputs"?: [{"name", "parameters"?}]}``; ``data`` is row-major, flat or nested;
- ``v2binary``: the binary tensor extension. The first ``json_len`` bytes are
  that JSON; an input with ``parameters.binary_data_size`` has no ``data``, its
  raw little-endian bytes follow the JSON, input after input. They are sliced
  from the frame without a copy.

The model takes one tensor, so the request must carry exactly one input (its
name is free: ``input__0``, ``INPUT0``, ...). Its first dimension is the batch,
and it becomes the same kind of job as a ``/predict`` request, batched with
the others. The result goes back as the outputs ``output__0`` (a tensor),
``output__<i>`` (a tuple or list of tensors) or the keys of a dict of tensors;
each is JSON ``data`` (flat, row-major) or, when asked for with
``parameters.binary_data_output`` or an output's ``parameters.binary_data``,
raw bytes after the JSON, whose length travels as ``json_len``.

``BYTES`` inputs (length-prefixed strings) only make sense to a handler's
``preprocess``, which gets them as nested lists of ``bytes``/``str``; a tensor
model refuses them with a 400.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch

from shared import protocol
from shared.errors import ModelFailure, PayloadTooLarge, RequestError
from shared.media import ENCODINGS, content_encoding
from worker.codec import jsonio, tensors
from worker.codec.inputs import InputSpec, check_body_size, check_not_empty, prepare

FORMATS: Final = frozenset({protocol.FMT_V2_JSON, protocol.FMT_V2_BINARY})
BYTES: Final = "BYTES"


@dataclass(frozen=True)
class Wanted:
    """One entry of the request's ``outputs``."""

    name: str
    binary: bool


@dataclass(frozen=True)
class V2Context:
    """What encoding the answer needs from the request."""

    model: str
    version: str
    request_id: str | None
    # None: every output, binary or not as ``binary_default`` says.
    wanted: tuple[Wanted, ...] | None
    binary_default: bool


class V2Codec:
    """``fmt`` ``v2json`` and ``v2binary``: an ``/infer`` request in, its response out."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, V2Context]:
        return decode_request(header, body, self.spec)

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        return encode_reply(context, result)


# --- decoding ---------------------------------------------------------------


def decode_request(
    header: Mapping[str, Any], body: bytes | memoryview, spec: InputSpec
) -> tuple[Any, V2Context]:
    """A ``v2json``/``v2binary`` REQUEST -> the model input and the reply's context."""
    max_bytes = spec.max_bytes
    body = _inflate(body, header.get("encoding"), max_bytes)
    check_body_size(body, max_bytes)
    view = memoryview(body)
    if header.get("fmt") == protocol.FMT_V2_BINARY:
        json_len = header.get("json_len")
        if not isinstance(json_len, int) or not 0 < json_len <= len(view):
            raise RequestError(
                f"Inference-Header-Content-Length {json_len!r} does not fit a body of "
                f"{len(view)} bytes"
            )
        document, binary = view[:json_len], view[json_len:]
    else:
        document, binary = view, view[:0]
    doc = jsonio.parse(document, "inference request")
    if not isinstance(doc, dict):
        raise RequestError('inference request must be an object like {"inputs": [...]}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"id must be a string, got {type(request_id).__name__}")
    binary_default = _flag(_parameters(doc, "request"), "binary_data_output")
    context = V2Context(
        str(header.get("model", "")),
        str(header.get("version", protocol.MODEL_VERSION)),
        request_id,
        _wanted(doc.get("outputs"), binary_default),
        binary_default,
    )
    takes_bytes = spec.preprocess is not None
    name, value = _single_input(doc.get("inputs"), binary, max_bytes, takes_bytes)
    return prepare(value, "application/json", spec, f"input {name!r}"), context


def _inflate(body: bytes | memoryview, encoding: Any, max_bytes: int) -> bytes | memoryview:
    """Undo the HTTP Content-Encoding, never producing more than ``max_bytes``."""
    if encoding is None:
        return body
    encoding = content_encoding(str(encoding))
    if encoding is None:
        return body
    inflater = zlib.decompressobj(ENCODINGS[encoding])
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise RequestError(f"body is not valid {encoding} data: {exc}") from exc
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise RequestError(f"{encoding} body is truncated")
    return data


def _parameters(obj: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError(f"{what} parameters must be an object")
    return parameters


def _flag(parameters: Mapping[str, Any], key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"parameter {key} must be true or false, got {value!r}")
    return value


def _wanted(outputs: Any, binary_default: bool) -> tuple[Wanted, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise RequestError("outputs must be a list of {name, parameters} objects")
    wanted: list[Wanted] = []
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError("every requested output needs a name")
        parameters = _parameters(entry, f"output {entry['name']!r}")
        if "classification" in parameters:
            raise RequestError("the classification extension is not supported")
        binary = _flag(parameters, "binary_data") if "binary_data" in parameters else binary_default
        wanted.append(Wanted(entry["name"], binary))
    return tuple(wanted)


def _single_input(
    inputs: Any, binary: memoryview, max_bytes: int, takes_bytes: bool
) -> tuple[str, Any]:
    """The one input's name and value: a tensor of its datatype, or nested BYTES."""
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inference request needs an inputs list with one tensor")
    if len(inputs) != 1:
        names = ", ".join(str(i.get("name")) if isinstance(i, dict) else "?" for i in inputs)
        raise RequestError(
            f"the model takes one input tensor; the request has {len(inputs)}: {names}"
        )
    spec = inputs[0]
    if not isinstance(spec, dict):
        raise RequestError("an input must be an object with name, shape, datatype and data")
    name = spec.get("name")
    if not isinstance(name, str):
        raise RequestError("the input needs a name")
    missing = [key for key in ("shape", "datatype") if key not in spec]
    if missing:
        raise RequestError(f"input {name!r} is missing {' and '.join(missing)}")
    shape = _shape(name, spec["shape"])
    datatype = spec["datatype"]
    size = _parameters(spec, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(f"input {name!r}: binary_data_size must be a byte count")
        if size != len(binary):
            raise RequestError(
                f"input {name!r} claims {size} binary bytes but {len(binary)} follow the JSON"
            )
        if "data" in spec:
            raise RequestError(f"input {name!r} has both data and binary_data_size")
    elif len(binary):
        raise RequestError(f"{len(binary)} bytes follow the JSON, but no input has binary data")
    elif "data" not in spec:
        raise RequestError(f"input {name!r} has no data")
    if datatype == BYTES:
        if not takes_bytes:
            raise RequestError(
                f"input {name!r} is BYTES, but the model takes numeric tensors; send one of "
                f"{', '.join(protocol.V2_DATATYPES)}"
            )
        elements = protocol.split_bytes(name, binary) if size is not None else _flat(spec["data"])
        return name, _nest(name, elements, shape)
    dtype_name = protocol.V2_DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype_name is None:
        raise RequestError(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of "
            f"{', '.join([*protocol.V2_DATATYPES, BYTES])}"
        )
    check_not_empty(shape, f"input {name!r}")
    if size is not None:
        protocol.check_tensor(dtype_name, list(shape), size, max_bytes)
        return name, tensors.from_bytes(binary, dtype_name, shape)
    return name, _from_json(name, spec["data"], shape, dtype_name, max_bytes)


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise RequestError(f"input {name!r}: shape must be a list of non-negative integers")
    if len(shape) > protocol.MAX_NDIM:
        raise RequestError(
            f"input {name!r} has {len(shape)} dimensions; at most {protocol.MAX_NDIM}"
        )
    return tuple(shape)


def _from_json(
    name: str, data: Any, shape: tuple[int, ...], dtype_name: str, max_bytes: int
) -> torch.Tensor:
    """JSON ``data`` (flat or nested) of the declared datatype -> a tensor of ``shape``."""
    count = math.prod(shape)
    if count * protocol.DTYPE_SIZES[dtype_name] > max_bytes:
        raise PayloadTooLarge(f"input {name!r} of shape {list(shape)} exceeds {max_bytes} bytes")
    tensor = tensors.from_list(data, tensors.torch_dtype(dtype_name), f"input {name!r}")
    if tensor.numel() != count:
        raise RequestError(
            f"input {name!r}: shape {list(shape)} needs {count} values, data holds {tensor.numel()}"
        )
    return tensor.reshape(shape)


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flat(item))
    return flat


def _nest(name: str, elements: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """A flat list in row-major order as nested lists of ``shape``."""
    if len(elements) != math.prod(shape):
        raise RequestError(
            f"input {name!r}: shape {list(shape)} needs {math.prod(shape)} elements, "
            f"data holds {len(elements)}"
        )
    if not shape:
        raise RequestError(f"input {name!r} is a scalar; the first dimension is the batch")
    nested: list[Any] = elements
    for dim in reversed(shape[1:]):
        nested = [nested[i : i + dim] for i in range(0, len(nested), dim)]
    return nested


# --- encoding ---------------------------------------------------------------


def named_outputs(result: Any) -> list[tuple[str, torch.Tensor]]:
    """A model result as v2 outputs: ``output__0``, ``output__<i>`` or a dict's keys."""
    if isinstance(result, torch.Tensor):
        pairs: list[tuple[str, Any]] = [("output__0", result)]
    elif isinstance(result, Mapping):
        pairs = [(str(key), value) for key, value in result.items()]
    elif isinstance(result, list | tuple):
        pairs = [(f"output__{i}", value) for i, value in enumerate(result)]
    else:
        raise ModelFailure(f"the model returned a {type(result).__name__}, not tensors")
    for name, value in pairs:
        if not isinstance(value, torch.Tensor):
            raise ModelFailure(
                f"output {name} is a {type(value).__name__}; v2 outputs must be tensors"
            )
    return pairs


def describe_outputs(result: Any) -> list[dict[str, Any]] | None:
    """The outputs a warm-up result shows: name, dtype and shape with -1 for the batch.

    None when the result is not something :func:`encode_reply` can send.
    """
    try:
        pairs = named_outputs(result)
    except ModelFailure:
        return None
    return [
        {
            "name": name,
            "dtype": tensors.dtype_name(tensor.dtype),
            "shape": [-1, *tensor.shape[1:]] if tensor.ndim else [],
        }
        for name, tensor in pairs
    ]


def encode_reply(context: V2Context, result: Any) -> tuple[bytes, str, dict[str, Any]]:
    """A model result -> (body, fmt, more REPLY header fields) of the v2 response."""
    pairs = named_outputs(result)
    if context.wanted is None:
        chosen = [(name, tensor, context.binary_default) for name, tensor in pairs]
    else:
        by_name = dict(pairs)
        unknown = [w.name for w in context.wanted if w.name not in by_name]
        if unknown:
            raise RequestError(
                f"unknown output {', '.join(map(repr, unknown))}; the model's outputs are "
                f"{', '.join(by_name)}"
            )
        chosen = [(w.name, by_name[w.name], w.binary) for w in context.wanted]
    outputs: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, tensor, binary in chosen:
        datatype = protocol.V2_NAMES.get(tensors.dtype_name(tensor.dtype))
        if datatype is None:
            raise ModelFailure(f"output {name} has dtype {tensor.dtype}, which v2 cannot carry")
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
        if binary:
            raw = tensors.to_bytes(tensor)
            output["parameters"] = {"binary_data_size": raw.nbytes}
            buffers.append(raw)
        else:
            output["data"] = jsonio.jsonable(tensor.reshape(-1))
        outputs.append(output)
    document: dict[str, Any] = {"model_name": context.model, "model_version": context.version}
    if context.request_id is not None:
        document["id"] = context.request_id
    document["outputs"] = outputs
    head = jsonio.dump(document)
    if not buffers:
        return head, protocol.FMT_V2_JSON, {}
    body = b"".join([head, *buffers])
    return body, protocol.FMT_V2_BINARY, {"json_len": len(head)}
