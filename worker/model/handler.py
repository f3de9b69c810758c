"""The interface of a user handler class (``--handler package.module:Class``).

A handler is for models that need code around them. Only ``load`` and
``predict`` are required. The worker:

1. builds it once: ``Class(**model_kwargs)``;
2. calls ``load(device)`` once, before the worker reports ready: put the model
   on ``device`` and in eval mode there;
3. per request, if defined, calls ``preprocess(payload)`` or
   ``preprocess(payload, content_type)`` (two positional parameters: it also
   gets the request's media type, e.g. ``"image/jpeg"``, without parameters).
   ``payload`` is what the client sent:

   - a JSON body: the value of ``input_tensor``, unchanged (a string, a list of
     strings, an object, numbers; nothing is validated first);
   - a msgpack body: the value of ``input_tensor`` (a tensor map is a tensor);
   - any other content type: the body as ``bytes``;
   - ``multipart/form-data`` with one file field (``curl -F file=@cat.jpg``):
     that file's bytes, and the content type is the part's own;
   - an Open Inference Protocol request: its one input (a tensor, or nested
     lists of ``bytes`` for ``BYTES``).

   It returns a tensor or a pytree of tensors (dict / tuple / list, nested
   allowed), any dtype, each tensor's first dimension this request's rows.
   Beside the tensors the pytree may hold static leaves: strings, bytes,
   numbers, booleans and None (sentence-transformers 6's tokenizer adds
   ``"modality": "text"``). They have no rows and reach ``predict`` as they are.
   Nothing is cast unless ``--input-dtype`` or ``input_dtype`` asks: then a
   plain tensor is cast to it, and in a pytree only the floating-point leaves
   are (token ids stay integers). An exception here answers that request
   with 400 (``preprocess rejected the input: ...``);
4. batches requests whose pytrees have the same structure, equal static
   leaves and, tensor by tensor, the same dtype and shape except the last
   dimension: each tensor is
   right-padded along its last dimension to the longest in the batch with the
   handler's ``pad_values``, then concatenated along dim 0 (leaves with fewer
   than two dimensions must match exactly). Waiting requests are grouped by
   length so padding stays small; others run in batches of their own;
5. per batch, calls ``predict(batch) -> output`` under
   ``torch.inference_mode()``, every leaf moved to ``device``. Return a tensor
   (or a tuple/list/dict of tensors) whose first dimension is the batch so the
   worker can split it by rows (a per-token output keeps the batch's padded
   length; strings and None in it go to every request as they are); any
   other output (a number, say, which may describe the whole batch) makes
   the worker call ``predict`` once per
   request. When ``predict`` raises on a batch, each request runs alone, so
   only the one that breaks it gets the 500;
6. per request, if defined, calls ``postprocess(output) -> Any`` with that
   request's rows; the result must be a tensor, or JSON-able data (lists,
   dicts, numbers, strings) holding tensors.

Streaming (generative models): a handler may define ``predict_stream(x)``, a
generator (``def`` with ``yield``, or ``async def`` with ``yield``) that yields
the outputs of one request one at a time; ``x`` is that request's input (what
``preprocess`` returned) on ``device``, its first dimension the request's rows.
Each yielded value goes through ``postprocess`` when defined and must then be
a tensor or JSON-able data. Such a model is not batched: the worker runs one
request at a time, iterating its generator to the end (or until the client
leaves, or the deadline: then the generator is closed, so its ``finally``
blocks run, within one yielded value). ``predict`` is then optional; requests
that do not ask for a stream get every output in one list. Defined with a
second positional parameter, ``predict_stream(x, parameters)`` also receives
the ``parameters`` object of a ``/v2/models/{name}/generate[_stream]`` request
(``{}`` when it has none, and on ``/predict``).

The OpenAI API (``/v1/...``, see :mod:`worker.codec.openai` and docs/openai.md):
``openai_routes`` lists the routes the handler serves, ``embeddings`` (then
``preprocess`` gets the request's inputs as one list, of strings or of
token-id lists, and ``predict`` returns one vector per input) or ``chat`` and
``completions`` (then ``preprocess`` gets the prompt, or the messages rendered
by ``tokenizer.apply_chat_template`` when the handler's ``tokenizer`` has a
chat template, else the messages themselves, and ``predict_stream(x,
parameters)`` yields text deltas); ``openai_parameters`` the sampling
parameters ``predict_stream`` reads (``max_tokens``, ``temperature``,
``top_p``, ``seed``). A model's ``openai`` setting overrides ``openai_routes``.

Optional attributes, read after ``load``:

- ``input_shape``: one row without the batch dimension, ``-1`` for a variable
  size; a plain tensor input that does not match gets 422;
- ``input_dtype``: a dtype name such as ``"float32"``. The ``--input-shape``
  and ``--input-dtype`` flags win over both;
- ``accepts``: the content types ``preprocess`` takes as raw bodies, wildcards
  allowed (``["image/*"]``); another type gets 415 naming them. Without it any
  type is taken. A model without ``preprocess`` takes only JSON and msgpack;
- ``pad_values``: the padding value, a number or ``{key: number}`` for the
  keys of a dict pytree (missing keys: 0); default 0;
- ``collate(items) -> batch`` and ``split(output, counts) -> list``: when
  defined, they replace padding/concatenation and the row split.

A handler instance is used by one thread only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from shared.errors import ModelLoadError
from worker.model.assembly import Assembly, PadValues


@runtime_checkable
class Handler(Protocol):
    """What ``--handler`` names; everything but ``load`` and ``predict`` is optional
    (and ``predict_stream`` may stand in for ``predict``)."""

    def load(self, device: torch.device) -> None:
        """Load the model onto ``device``; raise to fail the worker's boot."""

    def predict(self, batch: Any) -> Any:
        """Run the model on a batch (first dimension = rows of several requests)."""


def optional_hook(handler: object, name: str) -> Any:
    """``handler.<name>`` when defined and callable, else None."""
    hook = getattr(handler, name, None)
    return hook if callable(hook) else None


def preprocess_hook(handler: object) -> Callable[[Any, str], Any] | None:
    """The handler's ``preprocess``, always called as ``(payload, content_type)``.

    The signature is read once: two positional parameters (or ``*args``) get
    the content type too; one gets the payload alone.
    """
    hook = optional_hook(handler, "preprocess")
    if hook is None:
        return None
    if positional_count(hook) >= 2:
        two: Callable[[Any, str], Any] = hook
        return two
    return lambda payload, content_type: hook(payload)


def positional_count(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` takes (2 for ``*args``; 1 if unreadable)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 2
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds)


def accepts_of(handler: object, class_path: str) -> tuple[str, ...] | None:
    """The handler's ``accepts`` as lower-case media types, checked at load."""
    declared = getattr(handler, "accepts", None)
    if declared is None:
        return None
    accepts = [declared] if isinstance(declared, str) else declared
    if (
        not isinstance(accepts, Sequence)
        or not accepts
        or not all(isinstance(item, str) and "/" in item for item in accepts)
    ):
        raise ModelLoadError(
            f"--handler {class_path}: accepts must be a list of content types like "
            f"'image/*', got {declared!r}"
        )
    return tuple(item.strip().lower() for item in accepts)


def assembly_of(handler: object, class_path: str, padded: bool) -> Assembly:
    """How the worker batches this handler's requests (see :class:`Assembly`).

    ``padded``: whether its inputs may be padded (it has ``preprocess``, or
    says ``pad_values``); plain client tensors are never padded.
    """
    pad_values: PadValues | None = getattr(handler, "pad_values", None)
    valid = pad_values is None or _is_number(pad_values)
    if isinstance(pad_values, Mapping):
        valid = all(isinstance(k, str) and _is_number(v) for k, v in pad_values.items())
    if not valid:
        raise ModelLoadError(
            f"--handler {class_path}: pad_values must be a number or a dict of numbers, "
            f"got {pad_values!r}"
        )
    if pad_values is None and padded:
        pad_values = 0
    return Assembly(pad_values, optional_hook(handler, "collate"), optional_hook(handler, "split"))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
