"""Dynamic batching: which requests run together, and how results come apart.

Pure logic with no sockets, so it is tested in-process:

- :func:`collect` takes up to ``max_rows`` rows of work: whatever is already
  waiting, without blocking; then, while room is left, it waits for more only
  as long as the :class:`worker.serve.pacing.Pacer` says waiting can pay. A lone
  request runs at once and never waits.
- :func:`group` puts together requests whose inputs can be combined: the same
  pytree structure and, leaf by leaf, the same dtype and shape. With padding
  on (a handler with ``preprocess``), the last dimension may differ: each
  group is sorted by that length and cut where the longest request would be
  more than :data:`MAX_PAD_RATIO` times the shortest, so padding stays small.
- :func:`run_group` combines a group (right-padding the last dimension to the
  longest with the handler's pad values, then concatenating along dim 0; or
  the handler's ``collate``), runs one forward pass and splits the output
  back by each request's row count (or with the handler's ``split``). When
  the batched pass raises, each request runs alone so only the culprit gets
  a :class:`ModelFailure`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import torch

from worker import pytree
from worker.model.assembly import Assembly
from worker.serve.failure import model_failure
from worker.serve.pacing import Pacer

# A length group is cut where its longest request would be more than this many
# times its shortest. Measured on CPU (a 2-layer d=256 transformer encoder, one
# thread, 4 rows of each length): one padded batch vs two separate ones cost
# 82 vs 87 ms at lengths 32/48, 127 vs 114 ms at 32/64, 346 vs 164 ms at
# 32/128: compute follows the padded tokens, and the break-even is near 1.5x.
# (On a GPU a forward's fixed cost favours bigger batches; not measured here.)
MAX_PAD_RATIO: Final = 1.5

# How a plain tensor model's requests combine: exact shapes, no padding, no hooks.
PLAIN: Final = Assembly()


@dataclass(eq=False)
class Job:
    """One decoded request waiting for the model."""

    request_id: int
    fmt: str
    # A tensor, or a pytree of them, each leaf's first dimension the rows.
    inputs: Any
    # time.monotonic() past which the gateway no longer wants the answer.
    deadline: float | None = None
    # What the reply's encoder needs beyond the result (a v2 request's outputs, id).
    context: Any = None
    # time.monotonic() when the worker read it off the socket.
    arrived: float = 0.0

    @cached_property
    def rows(self) -> int:
        # Read once: batching asks for it several times per request.
        return int(pytree.tensors(self.inputs)[0].shape[0])


# receive(timeout_s) -> the next decoded job, or None when none came in time.
# timeout_s == 0 means only what is already waiting.
Receive = Callable[[float], "Job | None"]


def collect(
    pending: deque[Job],
    receive: Receive,
    max_rows: int,
    pacer: Pacer,
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
    # The window opens once the batch holds two requests; the pacer decides
    # how long each further wait may be (0: take only what is waiting).
    opened: float | None = None
    while rows < max_rows:
        timeout = 0.0
        if len(batch) >= 2:
            if opened is None:
                opened = clock()
            timeout = pacer.patience(len(batch), clock() - opened)
        job = receive(timeout)
        if job is None:
            break
        if batch and rows + job.rows > max_rows:
            pending.append(job)
            break
        batch.append(job)
        rows += job.rows
    return batch


def group(jobs: Sequence[Job], assembly: Assembly = PLAIN) -> list[list[Job]]:
    """Jobs split into batches that can be combined, in order of first appearance.

    With padding on, each set of compatible jobs is sorted by length and cut
    where the longest would be more than MAX_PAD_RATIO times the shortest.
    """
    compatible: dict[Hashable, list[Job]] = {}
    for job in jobs:
        compatible.setdefault(assembly.key(job.inputs), []).append(job)
    groups: list[list[Job]] = []
    for members in compatible.values():
        if len(members) == 1:
            groups.append(members)
            continue
        by_length = sorted(members, key=lambda job: assembly.length(job.inputs))
        current = [by_length[0]]
        shortest = max(assembly.length(by_length[0].inputs), 1)
        for job in by_length[1:]:
            length = assembly.length(job.inputs)
            if length > MAX_PAD_RATIO * shortest:
                groups.append(current)
                current, shortest = [], max(length, 1)
            current.append(job)
        groups.append(current)
    return groups


Forward = Callable[[Any], Any]


def rows_of(inputs: Any) -> int:
    return int(pytree.tensors(inputs)[0].shape[0])


def run_one(forward: Forward, inputs: Any, assembly: Assembly = PLAIN) -> Any:
    """One request alone; its result, or the ModelFailure it earned."""
    try:
        with torch.inference_mode():
            output = forward(assembly.combine([inputs]))
            if assembly.split is None:
                return output
            parts = assembly.divide(output, [rows_of(inputs)])
            return output if parts is None else parts[0]
    except Exception as exc:
        return model_failure(exc)


def run_group(forward: Forward, inputs: Sequence[Any], assembly: Assembly = PLAIN) -> list[Any]:
    """One result per input, each the model's output or a ModelFailure.

    ``inputs`` must share a key (see :meth:`Assembly.key`). One forward on
    their combination, split back; on an exception, or an output that cannot
    be split, each input runs alone.
    """
    if len(inputs) == 1:
        return [run_one(forward, inputs[0], assembly)]
    try:
        with torch.inference_mode():
            output = forward(assembly.combine(inputs))
            parts = assembly.divide(output, [rows_of(item) for item in inputs])
    except Exception:
        # Which request broke the batch is unknown; running each alone
        # finds the culprit and keeps the others' answers.
        parts = None
    if parts is not None:
        return parts
    return [run_one(forward, item, assembly) for item in inputs]
