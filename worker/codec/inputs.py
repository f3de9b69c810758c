"""What a model takes, and the one path every decoded request value takes to become it.

Each body format (:mod:`worker.codec.predict` for ``/predict``, :mod:`worker.codec.v2`
for the Open Inference Protocol) is a :class:`Codec`: it reads its envelope
and hands the payload to :func:`prepare`, so every format refuses the same
things alike:

- a model without ``preprocess`` takes tensors only: nested lists of numbers
  or a tensor, converted to the model's dtype without wrapping or truncating
  (see :mod:`worker.codec.tensors`) and checked against its row shape;
- a handler with ``preprocess`` gets the payload as sent and returns a tensor
  or a pytree of tensors, cast only when a dtype was asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import torch

from shared.errors import ModelFailure, PayloadTooLarge, RequestError, ShapeMismatch
from worker import pytree
from worker.codec import tensors

INPUT_KEY: Final = "input_tensor"

# preprocess(payload, content_type) -> a tensor or a pytree of tensors.
Preprocess = Callable[[Any, str], Any]


@dataclass(frozen=True)
class InputSpec:
    """The model's side of decoding: what it takes and the limits on a body."""

    dtype: torch.dtype
    input_shape: tuple[int, ...] | None
    max_bytes: int
    preprocess: Preprocess | None = None
    # Whether ``dtype`` was asked for (--input-dtype, a handler's input_dtype):
    # only then is what ``preprocess`` returns cast.
    dtype_asked: bool = False
    # Raw content types a handler takes ("image/*" allowed); None: any.
    accepts: tuple[str, ...] | None = None


def check_body_size(body: bytes | memoryview, max_bytes: int) -> None:
    """413 when a body (as received, or inflated) is longer than ``max_bytes``."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")


class Codec(Protocol):
    """One wire format (``fmt``): a REQUEST body in, a REPLY body out."""

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, Any]:
        """-> (the model input, the context :meth:`encode` needs for this request)."""
        ...

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        """-> (REPLY body, its fmt, more REPLY header fields)."""
        ...


def prepare(value: Any, content_type: str, spec: InputSpec, what: str = INPUT_KEY) -> Any:
    """A decoded payload -> the model input of one request (batch first).

    ``what`` names the value in messages. Raises RequestError (400) and
    ShapeMismatch (422) for the client's mistakes, ModelFailure when the
    handler's ``preprocess`` returns something that is not tensors.
    """
    if spec.preprocess is None:
        if isinstance(value, torch.Tensor):
            tensor = tensors.cast(value, spec.dtype, what)
        elif isinstance(value, list):
            tensor = tensors.from_list(value, spec.dtype, what)
        else:
            raise RequestError(
                f"{what} must be a list whose first dimension is the batch, "
                f"got {type(value).__name__}"
            )
        check_not_empty(tuple(tensor.shape), what)
        check_shape(tensor, spec.input_shape)
        return tensor
    try:
        result = spec.preprocess(value, content_type)
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"preprocess rejected the input: {type(exc).__name__}: {exc}") from exc
    _check_tree(result)
    if isinstance(result, torch.Tensor):
        if spec.dtype_asked and result.dtype != spec.dtype:
            result = result.to(spec.dtype)
        check_shape(result, spec.input_shape)
        return result
    if spec.dtype_asked:
        # Only floating-point leaves: token ids and masks stay integers.
        return pytree.map_leaves(
            lambda leaf: (
                leaf.to(spec.dtype)
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
                else leaf
            ),
            result,
        )
    return result


def _check_tree(result: Any) -> None:
    """A preprocess result must hold tensors whose first dimensions agree (the rows).

    Beside them it may hold static leaves (strings, numbers, booleans, None;
    see :mod:`worker.pytree`), passed to ``predict`` as they are.
    """
    leaves = pytree.leaves(result)
    kinds = {
        type(leaf).__name__
        for leaf in leaves
        if not isinstance(leaf, torch.Tensor) and not pytree.is_static(leaf)
    }
    found_tensors = pytree.tensors(result)
    if kinds or not found_tensors:
        found = ", ".join(sorted(kinds)) or ("no tensor" if leaves else "an empty container")
        raise ModelFailure(
            f"preprocess returned {found}; it must return a tensor or a dict/tuple/list "
            "holding tensors (beside them: strings, numbers, booleans or None)"
        )
    shapes = [tuple(leaf.shape) for leaf in found_tensors]
    if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        raise ModelFailure(
            f"preprocess returned tensors of shapes {[list(s) for s in shapes]}; every one "
            "needs the same first dimension (the request's rows)"
        )
    if shapes[0][0] == 0:
        raise RequestError("preprocess made no rows of this input")


def check_not_empty(shape: tuple[int, ...], what: str) -> None:
    if len(shape) == 0:
        raise RequestError(f"{what} is a scalar; the first dimension is the batch")
    if 0 in shape:
        raise RequestError(f"{what} is empty (shape {list(shape)})")


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
