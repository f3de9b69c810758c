"""Request bodies to tensors, and results to reply bodies.

Two body formats (see :mod:`shared.protocol`):

- ``json``: the HTTP body ``{"input_tensor": <nested list>}``, strict RFC 8259
  (NaN and Infinity are refused);
- ``msgpack``: ``{"input_tensor": {"dtype", "shape", "data"}}`` with raw bytes.

The Open Inference Protocol formats (``v2json``, ``v2binary``) live in
:mod:`worker.v2codec`, which ends in :func:`prepare_input` like these two.

Every decoding failure is a :class:`shared.errors.RequestError` (400) whose
message says what was wrong, or :class:`ShapeMismatch` (422) when the tensor is
well formed but not the shape the model takes. Nothing here runs the model.

Lists become arrays through numpy: ``np.array`` on the parsed lists and then
``torch.from_numpy`` measured about twice as fast as ``torch.tensor`` (64x16:
~80 us vs ~150 us; 16x512: ~450 us vs ~940 us). numpy is asked to infer the
dtype and the result is checked, because ``np.array(["1.5"], dtype=float32)``
would silently parse strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import orjson
import torch

from shared import protocol
from shared.errors import ModelFailure, PayloadTooLarge, RequestError, ShapeMismatch

INPUT_KEY: Final = "input_tensor"
OUTPUT_KEY: Final = "prediction"

# numpy dtype kinds that are numbers: bool, signed, unsigned, float.
_NUMERIC_KINDS: Final = frozenset("biuf")
# numpy and orjson cannot hold these; they travel in JSON as float32.
_WIDEN_FOR_JSON: Final = frozenset({torch.bfloat16, torch.float16})
_JSON_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``, for the names in ``protocol.DTYPE_SIZES``."""
    dtype = getattr(torch, name, None)
    if name not in protocol.DTYPE_SIZES or not isinstance(dtype, torch.dtype):
        raise RequestError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- decoding ---------------------------------------------------------------


def parse_json_body(body: bytes | memoryview, max_bytes: int) -> Any:
    """The ``input_tensor`` value of a JSON body, still as parsed JSON."""
    _check_body_size(body, max_bytes)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from exc
    return _input_value(doc)


def parse_msgpack_body(body: bytes | memoryview, max_bytes: int) -> Any:
    """The ``input_tensor`` value of a msgpack body: a tensor, or a nested list."""
    # unpack_body reports an oversized bin as malformed (400); the whole body's
    # size is checked first so that case is the 413 it is.
    _check_body_size(body, max_bytes)
    doc = protocol.unpack_body(body, max_bytes)
    value = _input_value(doc)
    if isinstance(value, Mapping):
        return tensor_from_wire(value, max_bytes)
    return value


def _check_body_size(body: bytes | memoryview, max_bytes: int) -> None:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")


def _input_value(doc: Any) -> Any:
    if not isinstance(doc, dict):
        raise RequestError(f'body must be an object like {{"{INPUT_KEY}": [[...]]}}')
    if INPUT_KEY not in doc:
        raise RequestError(f'body has no "{INPUT_KEY}" key')
    return doc[INPUT_KEY]


def tensor_from_list(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A nested list of numbers -> a tensor of ``dtype`` whose first dim is the batch."""
    if not isinstance(value, list):
        raise RequestError(
            f"{INPUT_KEY} must be a list whose first dimension is the batch, "
            f"got {type(value).__name__}"
        )
    try:
        array = np.array(value)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{INPUT_KEY} is ragged: every row must have the same length") from exc
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise RequestError(f"{INPUT_KEY} must hold only numbers, {_describe_non_numeric(array)}")
    if array.ndim > protocol.MAX_NDIM:
        raise RequestError(f"{INPUT_KEY} has {array.ndim} dimensions; at most {protocol.MAX_NDIM}")
    _check_not_empty(array.shape)
    if array.dtype == np.uint64:
        # numpy infers uint64 for integers in [2**63, 2**64), which torch.from_numpy
        # cannot take; only a float model can hold them.
        if not dtype.is_floating_point:
            raise RequestError(f"{INPUT_KEY} holds integers too large for {dtype_name(dtype)}")
        array = array.astype(np.float64)
    integral = not dtype.is_floating_point and dtype != torch.bool
    if integral and array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
        raise RequestError(f"{INPUT_KEY} holds fractions but the model takes {dtype_name(dtype)}")
    return torch.from_numpy(array).to(dtype)


def _describe_non_numeric(array: np.ndarray[Any, Any]) -> str:
    if array.dtype.kind in "US":
        return "found a string"
    return "found null, an object or a mix of lists and numbers"


def tensor_from_wire(value: Mapping[str, Any], max_bytes: int) -> torch.Tensor:
    """A checked ``{"dtype", "shape", "data"}`` map -> a tensor owning its memory."""
    wire = protocol.tensor_from_map(value, max_bytes)
    _check_not_empty(wire.shape)
    # The frame's buffer is read-only; torch needs a writable one it can own.
    flat = torch.frombuffer(bytearray(wire.data), dtype=torch_dtype(wire.dtype))
    return flat.reshape(wire.shape)


def _check_not_empty(shape: Sequence[int]) -> None:
    if len(shape) == 0:
        raise RequestError(f"{INPUT_KEY} is a scalar; the first dimension is the batch")
    if 0 in shape:
        raise RequestError(f"{INPUT_KEY} is empty (shape {list(shape)})")


def to_input(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A decoded ``input_tensor`` value (tensor or nested list) as a tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == dtype else value.to(dtype)
    return tensor_from_list(value, dtype)


def check_shape(tensor: torch.Tensor, expected: tuple[int, ...] | None) -> None:
    """Refuse a batch whose rows are not ``expected`` (-1 matches any size).

    Raises ShapeMismatch (422) naming both shapes; ``expected`` None accepts any
    shape with at least one dimension.
    """
    if tensor.ndim == 0:
        raise RequestError(f"{INPUT_KEY} is a scalar; the first dimension is the batch")
    if expected is None:
        return
    received = list(tensor.shape)
    rows = received[1:]
    if len(rows) == len(expected) and all(
        e in (-1, r) for e, r in zip(expected, rows, strict=True)
    ):
        return
    shown = ", ".join(["N", *("*" if e == -1 else str(e) for e in expected)])
    raise ShapeMismatch(
        f"expected shape [{shown}], received {received}",
        expected=[-1, *expected],
        received=received,
    )


Preprocess = Callable[[Any], torch.Tensor]


def decode_request(
    fmt: str,
    body: bytes | memoryview,
    *,
    dtype: torch.dtype,
    input_shape: tuple[int, ...] | None,
    max_bytes: int,
    preprocess: Preprocess | None = None,
) -> torch.Tensor:
    """A REQUEST body -> the checked input tensor (CPU, ``dtype``, batch first)."""
    if fmt == protocol.FMT_JSON:
        value = parse_json_body(body, max_bytes)
    elif fmt == protocol.FMT_MSGPACK:
        value = parse_msgpack_body(body, max_bytes)
    else:
        raise RequestError(f"unknown body format {fmt!r}")
    return prepare_input(value, dtype=dtype, input_shape=input_shape, preprocess=preprocess)


def prepare_input(
    value: Any,
    *,
    dtype: torch.dtype,
    input_shape: tuple[int, ...] | None,
    preprocess: Preprocess | None = None,
) -> torch.Tensor:
    """A decoded input value (tensor or nested list) through the handler's
    ``preprocess``, converted to ``dtype`` and checked against ``input_shape``.

    Shared by every body format, so they all refuse the same things alike.
    """
    if preprocess is not None:
        try:
            value = preprocess(value)
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(
                f"preprocess rejected the input: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(value, torch.Tensor):
            raise ModelFailure(f"preprocess returned {type(value).__name__}, not a tensor")
    tensor = to_input(value, dtype)
    check_shape(tensor, input_shape)
    return tensor


# --- encoding ---------------------------------------------------------------


def encode_reply(fmt: str, result: Any) -> bytes:
    """A model result -> the REPLY body, ``{"prediction": ...}`` in ``fmt``.

    Raises ModelFailure when the result holds something that cannot be sent.
    """
    if fmt == protocol.FMT_MSGPACK:
        try:
            return protocol.pack({OUTPUT_KEY: _to_wire(result)})
        except (TypeError, ValueError) as exc:
            raise ModelFailure(f"model output cannot be encoded as msgpack: {exc}") from exc
    try:
        return orjson.dumps({OUTPUT_KEY: _to_json(result)}, option=_JSON_OPTIONS)
    except TypeError as exc:
        raise ModelFailure(f"model output cannot be encoded as JSON: {exc}") from exc


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def _to_json(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = _host(obj)
        if tensor.dtype in _WIDEN_FOR_JSON:
            tensor = tensor.float()
        if tensor.ndim == 0:
            return tensor.item()
        return tensor.numpy()
    if isinstance(obj, Mapping):
        return {key: _to_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(value) for value in obj]
    return obj


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a ``{"dtype", "shape", "data"}`` map of little-endian bytes."""
    host = _host(tensor)
    data = host.reshape(-1).view(torch.uint8).numpy().tobytes()
    return protocol.TensorBytes(dtype_name(host.dtype), tuple(host.shape), data).to_map()


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    if isinstance(obj, Mapping):
        return {key: _to_wire(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_wire(value) for value in obj]
    return obj
