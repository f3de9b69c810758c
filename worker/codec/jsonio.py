"""JSON in and out, one way for every route: /predict, /v2, generate and streamed chunks.

- :func:`parse` reads a JSON document, strictly (RFC 8259: NaN and Infinity
  are refused), a 400 saying where it is not JSON;
- :func:`jsonable` turns a model's output into what :func:`dump` writes: each
  tensor through :func:`worker.codec.tensors.json_ready` (float32 written in its
  shortest form), dicts, lists and tuples walked, anything else as it is;
- :func:`dump` writes a document with the one set of orjson options, a
  ModelFailure (500) when an output cannot be written.

So the same output prints the same numbers on ``/predict``, ``/v2/.../infer``
and a Server-Sent Events stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
import torch

from shared.errors import ModelFailure, RequestError
from worker.codec import tensors

# numpy arrays (what json_ready makes of a tensor) and non-string dict keys
# (a handler's {0: ...}) are written as JSON.
OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def parse(body: bytes | memoryview, what: str = "body") -> Any:
    """The JSON document ``body`` holds; RequestError (400) naming ``what`` when it is not."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"{what} is not valid JSON: {exc}") from exc


def jsonable(obj: Any) -> Any:
    """A model's output with its tensors as :func:`dump` writes them."""
    if isinstance(obj, torch.Tensor):
        return tensors.json_ready(obj)
    if isinstance(obj, Mapping):
        return {key: jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(value) for value in obj]
    return obj


def dump(document: Any) -> bytes:
    """``document`` as JSON; ModelFailure when a model's output in it cannot be written."""
    try:
        return orjson.dumps(document, option=OPTIONS)
    except TypeError as exc:
        raise ModelFailure(f"model output cannot be encoded as JSON: {exc}") from exc
