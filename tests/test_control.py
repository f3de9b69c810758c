"""Fast tier: what a worker's heartbeat says about the batch it is running."""

from __future__ import annotations

import time

import pytest

from worker.control import WorkerState

pytestmark = pytest.mark.fast


def test_batch_s_counts_from_when_the_worker_became_busy() -> None:
    state = WorkerState()
    assert not state.busy and state.batch_s() is None
    state.busy = True
    started = time.monotonic()
    while time.monotonic() - started < 0.05:
        pass
    ran = state.batch_s()
    assert state.busy and ran is not None and 0.05 <= ran < 5
    state.busy = False
    assert not state.busy and state.batch_s() is None
