"""Numbers in, numbers out: the one set of tensor conversions every body format uses.

- :func:`from_list` turns parsed JSON (nested lists of numbers) into a tensor
  of a given dtype; :func:`from_bytes` views raw little-endian bytes as one;
  :func:`cast` converts a tensor a client sent to the dtype the model takes.
  All three refuse a value the target dtype cannot hold (a fraction or an
  out-of-range integer for an integer dtype, a finite number past a float
  dtype's range) with a 422 naming the value and the dtype: numbers never wrap
  or truncate on their way to the model.
- :func:`json_ready` and :func:`to_bytes` turn an output tensor into what
  orjson or a binary body carries.

Lists become arrays through numpy: ``np.array`` on the parsed lists and then
``torch.from_numpy`` measured about twice as fast as ``torch.tensor`` (64x16:
~80 us vs ~150 us; 16x512: ~450 us vs ~940 us). numpy is asked to infer the
dtype and the result is checked, because ``np.array(["1.5"], dtype=float32)``
would silently parse strings.
"""

from __future__ import annotations

import warnings
from typing import Any, Final

import numpy as np
import torch

from shared import protocol
from shared.errors import InvalidValue, RequestError

# numpy dtype kinds that are numbers: bool, signed, unsigned, float.
_NUMERIC_KINDS: Final = frozenset("biuf")
# numpy cannot hold bfloat16: it travels through float32 on the way in.
_THROUGH_FLOAT32: Final = frozenset({torch.bfloat16})
# Written to JSON as float32, which holds every value of theirs exactly: numpy
# has no bfloat16, and the project allows orjson versions (>=3.9) not checked to
# write numpy float16; the text is the same either way (float32's shortest form).
_WIDEN_FOR_JSON: Final = frozenset({torch.bfloat16, torch.float16})


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``, for the names in ``protocol.DTYPE_SIZES``."""
    dtype = getattr(torch, name, None)
    if name not in protocol.DTYPE_SIZES or not isinstance(dtype, torch.dtype):
        raise RequestError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- in ---------------------------------------------------------------------------


def from_list(value: Any, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Nested lists of numbers (or true/false) -> a tensor of ``dtype``.

    ``what`` names the value in messages (``input_tensor``, ``input 'x'``).
    Raises RequestError (400) for ragged or non-numeric data, and a 422 for
    numbers ``dtype`` cannot hold.
    """
    try:
        array = np.array(value)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{what} is ragged: every row must have the same length") from exc
    if array.dtype.kind not in _NUMERIC_KINDS:
        found = "a string" if array.dtype.kind in "US" else "null, an object or a mix"
        raise RequestError(f"{what} must hold only numbers, found {found}")
    if array.ndim > protocol.MAX_NDIM:
        raise RequestError(f"{what} has {array.ndim} dimensions; at most {protocol.MAX_NDIM}")
    check_fits(array, dtype, what)
    if dtype in _THROUGH_FLOAT32:
        return torch.from_numpy(array.astype(np.float32)).to(dtype)
    return torch.from_numpy(array.astype(_numpy_dtype(dtype)))


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    # Looked up once per dtype: building it from the name costs each request.
    found = _NUMPY_DTYPES.get(dtype)
    if found is None:
        found = _NUMPY_DTYPES[dtype] = np.dtype(dtype_name(dtype))
    return found


_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = {}


def from_bytes(data: Any, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A checked tensor's raw little-endian bytes as a tensor, without a copy.

    A view, not a copy: the bytes are this request's alone (a received frame,
    or the ``bytes`` msgpack just made), and live exactly as long as the job
    holding the tensor. A batch of several requests copies them into the
    concatenation and a move to a GPU copies them again, so copying here too
    would touch every byte once more for nothing. torch warns that the buffer
    is read-only; a model that writes to its input in place only changes
    memory nobody else reads, so the warning is silenced.
    """
    if not len(data):
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch_dtype(dtype)).reshape(shape)


def cast(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A tensor a client sent, as ``dtype``; 422 when a value does not fit it."""
    if tensor.dtype == dtype:
        return tensor
    host = tensor.float() if tensor.dtype in _THROUGH_FLOAT32 else tensor
    check_fits(host.numpy(force=True), dtype, what)
    return tensor.to(dtype)


def check_fits(array: np.ndarray[Any, Any], dtype: torch.dtype, what: str) -> None:
    """Raise a 422 naming the first value of ``array`` that ``dtype`` cannot hold."""
    if array.size == 0 or array.dtype.kind == "b":
        return
    name = dtype_name(dtype)
    if dtype.is_floating_point:
        # Integers wider than a float's mantissa round, as any float input does;
        # only a finite value past the float's range (70000 for float16) is refused.
        if dtype == torch.float64:
            return
        limit = _float_limit(dtype)
        # The common case in one pass: every magnitude in range (an inf or a
        # NaN fails this test and takes the exact path below).
        if float(np.abs(array).max()) <= limit:
            return
        values = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        if values.size == 0:
            return
        worst = values.flat[int(np.abs(values.astype(np.float64)).argmax())]
        if abs(float(worst)) > limit:
            raise _does_not_fit(what, worst, name, f"[{-limit:g}, {limit:g}]")
        return
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.trunc(np.nan_to_num(array)))
        if bad.any():
            value = array.flat[int(bad.argmax())].item()
            raise InvalidValue(
                f"{what} holds fractions ({value!r}) but the model takes {name}",
                dtype=name,
                value=value,
            )
    low, high = (0, 1) if dtype == torch.bool else _int_range(dtype)
    # As Python numbers, which compare exactly: float(2**63) > 2**63 - 1 holds
    # there, while numpy rounds the integer to a float and finds them equal.
    smallest, largest = array.min().item(), array.max().item()
    if smallest < low:
        raise _does_not_fit(what, smallest, name, f"[{low}, {high}]")
    if largest > high:
        raise _does_not_fit(what, largest, name, f"[{low}, {high}]")


def _float_limit(dtype: torch.dtype) -> float:
    limit = _FLOAT_LIMITS.get(dtype)
    if limit is None:
        limit = _FLOAT_LIMITS[dtype] = float(torch.finfo(dtype).max)
    return limit


_FLOAT_LIMITS: dict[torch.dtype, float] = {}


def _int_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def _is_float_name(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _does_not_fit(what: str, value: Any, dtype: str, bounds: str) -> InvalidValue:
    # A well-formed input that is not what the model takes: the 422 family.
    shown = value.item() if isinstance(value, np.generic) else value
    if isinstance(shown, float) and shown.is_integer() and not _is_float_name(dtype):
        shown = int(shown)  # 300.0 sent to an int8 model is the integer 300
    return InvalidValue(
        f"{what} holds {shown!r}, which does not fit {dtype} {bounds}", dtype=dtype, value=shown
    )


# --- out --------------------------------------------------------------------------


def host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def json_ready(tensor: torch.Tensor) -> Any:
    """An output tensor as what orjson writes: a numpy array, or a number for a scalar.

    bfloat16 and float16 are widened to float32 without changing a value; orjson
    writes a float32 in its shortest form that reads back as the same number.
    """
    data = host(tensor)
    if data.dtype in _WIDEN_FOR_JSON:
        data = data.float()
    if data.ndim == 0:
        return data.item()
    return data.numpy()


def to_bytes(tensor: torch.Tensor) -> memoryview:
    """An output tensor's little-endian bytes, row-major; no copy when already on the host."""
    return host(tensor).reshape(-1).view(torch.uint8).numpy().data
