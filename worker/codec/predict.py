"""``/predict`` bodies: the envelope ``{"input_tensor": ...}`` in, ``{"prediction": ...}`` out.

Two body formats (see :mod:`shared.protocol`), one :class:`~worker.codec.inputs.Codec` each:

- ``json``: ``{"input_tensor": <nested list>}``, strict RFC 8259 (NaN and
  Infinity are refused);
- ``msgpack``: ``{"input_tensor": {"dtype", "shape", "data"}}`` with raw bytes
  (or a nested list).

Only the envelope is read here; the payload goes through
:func:`worker.codec.inputs.prepare` and the tensor conversions of
:mod:`worker.codec.tensors`, which the Open Inference Protocol formats
(:mod:`worker.codec.v2`) share. Every decoding failure is a
:class:`shared.errors.RequestError` (400) whose message says what was wrong,
or a 422 when the input is well formed but not what the model takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch

from shared import protocol
from shared.errors import ModelFailure, RequestError
from worker.codec import jsonio, tensors
from worker.codec.inputs import INPUT_KEY, InputSpec, check_body_size, check_not_empty, prepare

OUTPUT_KEY: Final = "prediction"


class JsonCodec:
    """``fmt == "json"``: a JSON body in, a JSON body out."""

    content_type: Final = "application/json"

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, None]:
        value = parse_json_body(body, self.spec.max_bytes)
        return prepare(value, self.content_type, self.spec), None

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        return encode_json(result), protocol.FMT_JSON, {}


class MsgpackCodec:
    """``fmt == "msgpack"``: tensors as raw bytes in and out."""

    content_type: Final = "application/msgpack"

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, None]:
        value = parse_msgpack_body(body, self.spec.max_bytes)
        return prepare(value, self.content_type, self.spec), None

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        try:
            body = protocol.pack({OUTPUT_KEY: _to_wire(result)})
        except (TypeError, ValueError) as exc:
            raise ModelFailure(f"model output cannot be encoded as msgpack: {exc}") from exc
        return body, protocol.FMT_MSGPACK, {}


# --- decoding ---------------------------------------------------------------


def parse_json_body(body: bytes | memoryview, max_bytes: int) -> Any:
    """The ``input_tensor`` value of a JSON body, still as parsed JSON."""
    check_body_size(body, max_bytes)
    return _input_value(jsonio.parse(body))


def parse_msgpack_body(body: bytes | memoryview, max_bytes: int) -> Any:
    """The ``input_tensor`` value of a msgpack body: a tensor, or what else was sent."""
    # unpack_body reports an oversized bin as malformed (400); the whole body's
    # size is checked first so that case is the 413 it is.
    check_body_size(body, max_bytes)
    doc = protocol.unpack_body(body, max_bytes)
    value = _input_value(doc)
    if isinstance(value, Mapping):
        return tensor_from_wire(value, max_bytes)
    return value


def _input_value(doc: Any) -> Any:
    if not isinstance(doc, dict):
        raise RequestError(f'body must be an object like {{"{INPUT_KEY}": [[...]]}}')
    if INPUT_KEY not in doc:
        raise RequestError(f'body has no "{INPUT_KEY}" key')
    return doc[INPUT_KEY]


def tensor_from_wire(value: Mapping[str, Any], max_bytes: int) -> torch.Tensor:
    """A checked ``{"dtype", "shape", "data"}`` map -> a tensor of its own dtype."""
    wire = protocol.tensor_from_map(value, max_bytes)
    check_not_empty(wire.shape, INPUT_KEY)
    return tensors.from_bytes(wire.data, wire.dtype, wire.shape)


# --- encoding ---------------------------------------------------------------


def encode_json(result: Any) -> bytes:
    """A model result as ``{"prediction": ...}`` JSON; ModelFailure if it cannot be."""
    return jsonio.dump({OUTPUT_KEY: jsonio.jsonable(result)})


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a ``{"dtype", "shape", "data"}`` map of little-endian bytes."""
    return protocol.TensorBytes(
        tensors.dtype_name(tensor.dtype), tuple(tensor.shape), tensors.to_bytes(tensor)
    ).to_map()


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    if isinstance(obj, Mapping):
        return {key: _to_wire(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_wire(value) for value in obj]
    return obj
