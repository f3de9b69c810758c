"""The interface of a user handler class (``--handler package.module:Class``).

A handler is for models that need code around them. The worker:

1. builds it once: ``Class(**model_kwargs)``;
2. calls ``load(device)`` once, before the worker reports ready: put the model
   on ``device`` and in eval mode there;
3. per request, if defined, calls ``preprocess(payload) -> Tensor`` with the
   decoded ``input_tensor`` value (a nested list from JSON, a tensor from
   msgpack) and expects a tensor whose first dimension is the batch; an
   exception here answers that request with 400;
4. per batch, calls ``predict(batch) -> output`` under
   ``torch.inference_mode()``; ``batch`` is the concatenation of several
   requests' tensors on ``device``. Return a tensor (or a tuple/list/dict of
   tensors) whose first dimension is the batch so the worker can split it;
   any other output makes the worker call ``predict`` once per request;
5. per request, if defined, calls ``postprocess(output) -> Any`` with that
   request's slice of the output; the result must be a tensor, or JSON-able
   data (lists, dicts, numbers, strings) holding tensors.

Streaming (generative models): a handler may define ``predict_stream(x)``, a
generator (``def`` with ``yield``, or ``async def`` with ``yield``) that yields
the outputs of one request one at a time; ``x`` is that request's tensor
(after ``preprocess``) on ``device``, its first dimension the request's rows.
Each yielded value goes through ``postprocess`` when defined and must then be
a tensor or JSON-able data. Such a model is not batched: the worker runs one
request at a time, iterating its generator to the end (or until the client
leaves, or the deadline: then the generator is closed, so its ``finally``
blocks run, within one yielded value). ``predict`` is then optional; requests
that do not ask for a stream get every output in one list.

Optional attributes, read after ``load``: ``input_shape`` (one row without
the batch dimension, ``-1`` for a variable size; requests that do not match
get 422) and ``input_dtype`` (a dtype name such as ``"float32"``). The
``--input-shape`` and ``--input-dtype`` flags win over them.

A handler instance is used by one thread only.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Handler(Protocol):
    """What ``--handler`` names. ``preprocess``/``postprocess`` are optional, and
    ``predict_stream`` may stand in for ``predict``."""

    def load(self, device: torch.device) -> None:
        """Load the model onto ``device``; raise to fail the worker's boot."""

    def predict(self, batch: torch.Tensor) -> Any:
        """Run the model on a batch (first dimension = rows of several requests)."""


def optional_hook(handler: object, name: str) -> Any:
    """``handler.preprocess`` / ``handler.postprocess`` when defined and callable."""
    hook = getattr(handler, name, None)
    return hook if callable(hook) else None
