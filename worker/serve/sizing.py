"""Batches that pay: the batch size past which more rows per pass stop raising rows per second.

A bigger batch is not always faster per row: ResNet-18 on one CPU thread ran
batches of 16 images slower per image than batches of 8 (the activations
outgrow the caches), so at 32 clients torchpool served fewer images per
second than at 8. :class:`BatchSizer` learns, from the worker's own passes,
where growth stops paying, separately for each intra-op thread count (a lent
pass has more threads, and its best size differs):

- batch sizes are measured in steps: 1, 2, 4, 8, ... up to ``--max-batch-size``
  (which stays the cap, and is the last step);
- each step's rows per second is a running mean over the passes whose rows
  fall in it (at least that step, below the next); the first pass of each
  exact row count is left out, since it pays for one-time work (oneDNN
  builds a kernel per new shape);
- a step not measured yet is taken to pay, so a fresh worker batches up to
  the cap at once, as it did before sizing existed; the limit is the last
  measured step that beats every smaller measured one by :data:`MARGIN`, and
  stops below the first measured step that does not;
- to learn, while the step just below the limit has no measure, one batch in
  :data:`PROBE_EVERY` is held to that step; once it is measured, every
  :data:`REVISIT` passes at the limit one batch tries the step above or below
  (in turn), so a measure taken under other conditions does not stand forever.

Under light load batches stay small whatever the limit is; the limit only
bites when more rows wait than it lets in, which is when throughput counts.

The same rates say whether borrowing idle cores pays (:meth:`BatchSizer.lend_pays`):
a lent pass runs with more threads, so its rows per second land in the wider
thread count's table. A lend goes ahead while the wider count is unmeasured at
the batch's step, or when it beats the worker's own count by :data:`LEND_MARGIN`,
comparing the medians of each count's last :data:`_RECENT` passes (a running
mean swings with one pass slowed by a neighbour, and flipped the verdict to
and fro on a text encoder that two threads do not speed up).
Some models gain nothing from a second thread (a small text encoder's
one-row passes are dozens of tiny operations, each too short to split), and
a lend there only burns the lender's core; a ResNet's convolutions gain
1.2-1.45x. Once the wide count is measured and the own one is not, passes
stay on the worker's own cores until it is; every :data:`REVISIT` passes one
pass takes the other choice, so a verdict reached under other conditions
does not stand forever, and while the call is close (the two medians within
twice the margin) one pass in :data:`CONFIRM_EVERY` takes the other choice.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from typing import Final

# A bigger step must beat the smaller one's rows per second by this fraction.
MARGIN: Final = 0.05
# Passes a step needs before its rate is compared.
SAMPLES: Final = 3
# Passes at the limit between two tries of the step above or below.
REVISIT: Final = 64
# While the step below the limit is unmeasured, one batch in this many is held to it.
PROBE_EVERY: Final = 4
# Weight of the newest pass in a step's running rate.
_SMOOTHING: Final = 0.3
# A lend must serve this much more rows per second than the worker's own threads:
# it occupies another core, and two medians of a few noisy passes differ by a few
# percent when the true speeds are equal.
LEND_MARGIN: Final = 0.10
# While the two choices' medians are within twice LEND_MARGIN, one pass in this many
# takes the choice not made.
CONFIRM_EVERY: Final = 8
# Passes whose median rate the lend decision compares.
_RECENT: Final = 8


def steps(max_rows: int) -> list[int]:
    """1, 2, 4, ... below ``max_rows``, then ``max_rows`` itself."""
    sizes = []
    size = 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


class _Rate:
    __slots__ = ("recent", "rows_per_s", "samples")

    def __init__(self) -> None:
        self.rows_per_s = 0.0
        self.samples = 0
        self.recent: deque[float] = deque(maxlen=_RECENT)

    def add(self, rows_per_s: float) -> None:
        if self.samples == 0:
            self.rows_per_s = rows_per_s
        else:
            self.rows_per_s += _SMOOTHING * (rows_per_s - self.rows_per_s)
        self.samples += 1
        self.recent.append(rows_per_s)

    def typical(self) -> float:
        """The median of the recent passes: one pass slowed by a neighbour does not sway it."""
        return statistics.median(self.recent)


class BatchSizer:
    """The most rows the next batch should take (see the module docstring)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.steps = steps(max_rows)
        self._rates: dict[tuple[int, int], _Rate] = {}
        self._seen: set[tuple[int, int]] = set()
        # Per thread count: passes at the limit since a neighbour step was last tried,
        # limit() calls, and whether the last such try went up.
        self._at_limit: dict[int, int] = {}
        self._calls: dict[int, int] = {}
        self._upward: dict[int, bool] = {}
        # Per (wider thread count, step): lend decisions since the other choice was tried.
        self._since_other: dict[tuple[int, int], int] = {}

    def _rate(self, threads: int, step: int) -> _Rate | None:
        rate = self._rates.get((threads, step))
        return rate if rate is not None and rate.samples >= SAMPLES else None

    def learned(self, threads: int) -> int:
        """The step where rows per second stop growing, as measured so far.

        Steps not measured yet are taken to pay: with nothing measured, the cap.
        """
        best: tuple[int, float] | None = None
        for step in self.steps:
            rate = self._rate(threads, step)
            if rate is None:
                continue
            if best is not None and rate.rows_per_s < best[1] * (1 + MARGIN):
                return best[0]
            best = (step, rate.rows_per_s)
        return self.steps[-1]

    def limit(self, threads: int) -> int:
        """Rows the next batch may hold, for a pass with ``threads`` intra-op threads."""
        learned = self.learned(threads)
        index = self.steps.index(learned)
        below = self.steps[index - 1] if index else None
        calls = self._calls[threads] = self._calls.get(threads, 0) + 1
        if below is not None and self._rate(threads, below) is None:
            return below if calls % PROBE_EVERY == 0 else learned
        if self._at_limit.get(threads, 0) >= REVISIT:
            self._at_limit[threads] = 0
            upward = self._upward[threads] = not self._upward.get(threads, False)
            if upward and learned < self.max_rows:
                return self.steps[index + 1]
            if not upward and below is not None:
                return below
        return learned

    def step_of(self, rows: int) -> int:
        """The step a batch of ``rows`` rows is measured under."""
        return self.steps[max(bisect.bisect_right(self.steps, rows) - 1, 0)]

    def lend_pays(self, own: int, wider: int, rows: int) -> bool:
        """Whether a batch of ``rows`` should run on ``wider`` threads (borrowed cores)
        rather than the worker's ``own`` (see the module docstring)."""
        step = self.step_of(rows)
        lent, alone = self._rate(wider, step), self._rate(own, step)
        if lent is None:
            return True  # not measured yet: try it
        if alone is None:
            return False  # measure the worker's own threads at this step first
        gain = lent.typical() / alone.typical() - 1
        verdict = gain >= LEND_MARGIN
        # A close call is checked often, either way: the choice not taken is
        # measured only when it is tried, and a stale window of it (a few passes
        # slowed by a neighbour while the pool warmed up, say) would otherwise
        # keep a useless lend going, or a useful one from starting, for
        # REVISIT * _RECENT passes.
        close = -2 * LEND_MARGIN < gain < 2 * LEND_MARGIN
        every = CONFIRM_EVERY if close else REVISIT
        key = (wider, step)
        since = self._since_other.get(key, 0) + 1
        if since >= every:
            self._since_other[key] = 0
            return not verdict
        self._since_other[key] = since
        return verdict

    def observe(self, threads: int, rows: int, seconds: float) -> None:
        """Fold one forward pass in: ``rows`` rows in ``seconds`` on ``threads`` threads."""
        if rows < 1 or seconds <= 0:
            return
        if (threads, rows) not in self._seen:
            self._seen.add((threads, rows))
            return
        step = self.step_of(rows)
        self._rates.setdefault((threads, step), _Rate()).add(rows / seconds)
        if step == self.learned(threads):
            self._at_limit[threads] = self._at_limit.get(threads, 0) + 1
