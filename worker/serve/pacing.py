"""Adaptive batching: whether a batch waits for more requests, and for how long.

A fixed delay makes every batch wait out the whole of ``--max-batch-delay-ms``
for rows that may never come. Under closed-loop load (each client waits for
its answer before it sends again, as most do) the rows a worker could wait
for are mostly already on its socket; the rest come only after it answers.
So :class:`Pacer` lets a batch wait only while waiting can pay:

- never for a lone request (nothing else is outstanding on this worker);
- never while the gateway has requests queued for want of credit: those
  reach a worker only once one answers, so waiting delays them too;
- otherwise for at most ``forward_s / held``, where ``forward_s`` is the
  measured duration of a recent forward pass and ``held`` the requests the
  batch already holds. Each of them pays the wait, while a newcomer that makes
  it in saves about one forward pass (the next batch); past that bound the
  wait costs more than it can save. Every arrival raises ``held``, so the
  window shrinks as the batch fills;
- and never past ``--max-batch-delay-ms`` since the window opened.

On a small model (a forward of tens of microseconds) that is no wait at all;
on a heavy one (milliseconds) the window stays open long enough to fill a
batch when requests keep coming. The time each request spent in the worker
before its forward pass is recorded (:class:`WaitHistogram`) and reaches
``/metrics`` as ``torchpool_batch_wait_seconds``, so what batching costs is
seen, not guessed.
"""

from __future__ import annotations

import bisect
from typing import Final

from shared import protocol

# Weight of the newest forward pass in the running estimate of its duration.
_SMOOTHING: Final = 0.2


class Pacer:
    """How long a collecting batch may still wait (see the module docstring)."""

    def __init__(self, max_delay_s: float) -> None:
        self.max_delay_s = max_delay_s
        self.forward_s: float | None = None
        # The gateway's queue length as the newest REQUEST reported it.
        self.gateway_queued = 0

    def observe_forward(self, seconds: float) -> None:
        """Fold one forward pass's duration into the estimate."""
        if self.forward_s is None:
            self.forward_s = seconds
        else:
            self.forward_s += _SMOOTHING * (seconds - self.forward_s)

    def patience(self, held: int, waited_s: float) -> float:
        """Seconds the batch may still wait for one more request (0: run now).

        ``held`` is the requests in the batch, ``waited_s`` how long the
        window has been open.
        """
        if held < 2 or self.max_delay_s <= 0 or self.gateway_queued > 0:
            return 0.0
        left = self.max_delay_s - waited_s
        if self.forward_s is not None:
            left = min(left, self.forward_s / held)
        return max(0.0, left)


class WaitHistogram:
    """Seconds from a request's arrival to its forward pass, in fixed buckets.

    Counts are cumulative for the process, so a lost heartbeat loses nothing;
    only the serving loop writes them.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(protocol.WAIT_BUCKETS_S) + 1)
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(protocol.WAIT_BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def report(self) -> dict[str, object]:
        """``{"counts": [...], "sum": s}`` for a heartbeat's ``waits``."""
        return {"counts": list(self.counts), "sum": self.total_s}
