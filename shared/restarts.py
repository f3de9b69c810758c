"""The restart rule: how long a dead worker waits before it is started again, and
when a worker that keeps dying is in a crash loop or given up on.

One rule for every supervisor of worker processes: the gateway's (for its
local slots) and ``torchpool worker --restart`` (for its one child on a remote
host). What counts is ``boot_failures``: deaths in a row before the worker
became ready. A worker that was ready and then died is replaced at once; one
that dies booting waits an exponential backoff, so a model that cannot load
never loops hot.
"""

from __future__ import annotations

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
# Deaths before ready, in a row, from which a worker is in a crash loop: requests
# stop waiting for it (503 at once) while it is still restarted with backoff.
CRASH_LOOP_BOOTS = 2
# Deaths before ready, in a row, after which a worker is not restarted at all.
MAX_BOOT_FAILURES = 5


def backoff_s(boot_failures: int) -> float:
    """Seconds to wait before the next start: 0 after a death once ready, then 0.5, 1, 2..."""
    if boot_failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (boot_failures - 1))


def crash_looping(boot_failures: int) -> bool:
    """Whether a worker that died ``boot_failures`` times in a row booting is in a crash loop."""
    return boot_failures >= CRASH_LOOP_BOOTS


def given_up(boot_failures: int) -> bool:
    """Whether a worker that died that often booting is not to be restarted any more."""
    return boot_failures >= MAX_BOOT_FAILURES
