"""Dynamic batching: which requests run together, and how results come apart.

Pure logic with no sockets, so it is tested in-process:

- :func:`collect` takes up to ``max_rows`` rows of work: whatever is already
  waiting, without blocking; and only when that already makes two or more
  requests (there is load) and room is left, it waits up to ``max_delay_s``
  for more. A lone request runs at once and never waits out the delay.
- :func:`group` puts together requests whose rows have the same shape and
  dtype; only those can be concatenated.
- :func:`run_group` runs one forward pass on the concatenation and splits the
  output back by each request's row count. When the batched pass raises, each
  request runs alone so only the culprit gets a :class:`ModelFailure`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import ModelFailure

# Message of a model exception in a reply; long enough for a real shape error.
_MAX_MESSAGE = 2000


@dataclass(eq=False)
class Job:
    """One decoded request waiting for the model."""

    request_id: int
    fmt: str
    tensor: torch.Tensor
    # time.monotonic() past which the gateway no longer wants the answer.
    deadline: float | None = None
    # What the reply's encoder needs beyond the result (a v2 request's outputs, id).
    context: Any = None

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def key(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Requests with equal keys can be concatenated along dim 0."""
        return tuple(self.tensor.shape[1:]), self.tensor.dtype


# receive(timeout_s) -> the next decoded job, or None when none came in time.
# timeout_s == 0 means only what is already waiting.
Receive = Callable[[float], "Job | None"]


def collect(
    pending: deque[Job],
    receive: Receive,
    max_rows: int,
    max_delay_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[Job]:
    """The next batch: pending jobs first, then what ``receive`` yields.

    A job that would take the batch past ``max_rows`` is left at the front
    of ``pending`` for the next call; the first job is always taken, even
    when it alone has more rows than ``max_rows``.
    """
    batch: list[Job] = []
    rows = 0
    while pending and (not batch or rows + pending[0].rows <= max_rows):
        head = pending.popleft()
        batch.append(head)
        rows += head.rows
    if pending or rows >= max_rows:
        return batch
    # The delay window opens once the batch holds two requests: a lone
    # request must not pay for a wait that may bring nothing.
    give_up: float | None = None
    while rows < max_rows:
        timeout = 0.0
        if len(batch) >= 2 and max_delay_s > 0:
            if give_up is None:
                give_up = clock() + max_delay_s
            timeout = give_up - clock()
            if timeout <= 0:
                break
        job = receive(timeout)
        if job is None:
            break
        if batch and rows + job.rows > max_rows:
            pending.append(job)
            break
        batch.append(job)
        rows += job.rows
    return batch


def group(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs split by row shape and dtype, in order of first appearance."""
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return list(groups.values())


def split_output(output: Any, counts: Sequence[int]) -> list[Any] | None:
    """Cut a batched output into one piece per request, by row count.

    Tensors are split along dim 0; tuples, lists and dicts are split leaf by
    leaf. Returns None when the output cannot be cut that way (a tensor whose
    first dimension is not the total row count, or a leaf that is not a
    tensor): the caller then runs each request alone.
    """
    total = sum(counts)
    if isinstance(output, torch.Tensor):
        if output.ndim == 0 or output.shape[0] != total:
            return None
        return list(torch.split(output, list(counts)))
    if isinstance(output, Mapping):
        columns = {key: split_output(value, counts) for key, value in output.items()}
        if any(parts is None for parts in columns.values()):
            return None
        return [
            {key: parts[i] for key, parts in columns.items() if parts is not None}
            for i in range(len(counts))
        ]
    if isinstance(output, list | tuple):
        items = [split_output(value, counts) for value in output]
        if not items:
            return None
        pieces: list[list[Any]] = []
        for parts in items:
            if parts is None:
                return None
            pieces.append(parts)
        return [type(output)(parts[i] for parts in pieces) for i in range(len(counts))]
    return None


def model_failure(exc: BaseException) -> ModelFailure:
    """The reply for a model that raised: its exception type and message."""
    message = f"{type(exc).__name__}: {exc}"
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return ModelFailure(message)


Forward = Callable[[torch.Tensor], Any]


def run_one(forward: Forward, tensor: torch.Tensor) -> Any:
    """One request alone; its result, or the ModelFailure it earned."""
    try:
        with torch.inference_mode():
            return forward(tensor)
    except Exception as exc:
        return model_failure(exc)


def run_group(forward: Forward, inputs: Sequence[torch.Tensor]) -> list[Any]:
    """One result per input, each the model's output or a ModelFailure.

    ``inputs`` must share row shape and dtype. One forward on their
    concatenation, split back; on an exception, or an output that cannot be
    split, each input runs alone.
    """
    if len(inputs) == 1:
        return [run_one(forward, inputs[0])]
    try:
        with torch.inference_mode():
            output = forward(torch.cat(list(inputs)))
        parts = split_output(output, [int(t.shape[0]) for t in inputs])
    except Exception:
        # Which request broke the batch is unknown; running each alone
        # finds the culprit and keeps the others' answers.
        parts = None
    if parts is not None:
        return parts
    return [run_one(forward, tensor) for tensor in inputs]
