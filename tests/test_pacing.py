"""Fast tier: when adaptive batching waits, and what it records."""

from __future__ import annotations

from collections import deque

import pytest

from shared import protocol
from tests.test_worker_batching import Arrivals, ids, job
from worker.serve.batching import Job, collect
from worker.serve.loop import await_message
from worker.serve.pacing import Pacer, WaitHistogram

pytestmark = pytest.mark.fast


def test_no_wait_before_any_forward_is_measured_is_bounded_by_the_delay() -> None:
    pacer = Pacer(0.002)
    assert pacer.patience(held=2, waited_s=0.0) == pytest.approx(0.002)
    assert pacer.patience(held=2, waited_s=0.0015) == pytest.approx(0.0005)
    assert pacer.patience(held=2, waited_s=0.003) == 0.0


def test_lone_request_and_zero_delay_never_wait() -> None:
    pacer = Pacer(0.002)
    pacer.observe_forward(0.010)
    assert pacer.patience(held=1, waited_s=0.0) == 0.0
    assert Pacer(0.0).patience(held=4, waited_s=0.0) == 0.0


def test_a_cheap_forward_is_not_worth_waiting_for() -> None:
    pacer = Pacer(0.002)
    pacer.observe_forward(40e-6)  # a small MLP: tens of microseconds
    # Four held requests each pay the wait; a newcomer saves one forward at most.
    assert pacer.patience(held=4, waited_s=0.0) == pytest.approx(10e-6)


def test_the_window_shrinks_as_the_batch_fills() -> None:
    pacer = Pacer(0.010)
    pacer.observe_forward(0.008)
    waits = [pacer.patience(held=n, waited_s=0.0) for n in (2, 4, 8)]
    assert waits == pytest.approx([0.004, 0.002, 0.001])


def test_never_waits_while_the_gateway_queues_for_credit() -> None:
    pacer = Pacer(0.010)
    pacer.observe_forward(0.008)
    pacer.gateway_queued = 3
    assert pacer.patience(held=4, waited_s=0.0) == 0.0


def test_forward_estimate_follows_the_model() -> None:
    pacer = Pacer(0.010)
    for _ in range(50):
        pacer.observe_forward(0.001)
    assert pacer.forward_s == pytest.approx(0.001)
    for _ in range(50):
        pacer.observe_forward(0.005)
    assert pacer.forward_s == pytest.approx(0.005, rel=1e-3)


def test_collect_takes_what_is_waiting_without_waiting_on_a_cheap_model() -> None:
    pacer = Pacer(0.002)
    pacer.observe_forward(1e-6)
    arrivals = Arrivals([job(1), job(2), job(3)])
    batch = collect(deque[Job](), arrivals, max_rows=8, pacer=pacer)
    assert ids(batch) == [1, 2, 3]
    # Each wait for one more is bounded by the forward it could save.
    assert max(arrivals.timeouts) <= 1e-6 / 2
    assert arrivals.timeouts[-1] == pytest.approx(1e-6 / 3, rel=0.1)


def test_collect_waits_for_more_on_a_costly_model() -> None:
    pacer = Pacer(0.050)
    pacer.observe_forward(0.040)
    arrivals = Arrivals([job(1), job(2)], later=[job(3), job(4)])
    batch = collect(deque[Job](), arrivals, max_rows=8, pacer=pacer)
    assert ids(batch) == [1, 2, 3, 4]


def test_wait_histogram_buckets_and_sum() -> None:
    histogram = WaitHistogram()
    for seconds in (0.0, 0.00005, 0.0003, 0.003, 1.0):
        histogram.observe(seconds)
    report = histogram.report()
    counts = report["counts"]
    assert isinstance(counts, list) and len(counts) == len(protocol.WAIT_BUCKETS_S) + 1
    assert counts[0] == 2  # <= 100 us
    assert counts[protocol.WAIT_BUCKETS_S.index(0.0005)] == 1
    assert counts[protocol.WAIT_BUCKETS_S.index(0.005)] == 1
    assert counts[-1] == 1  # past the last bound
    assert report["sum"] == pytest.approx(1.00335)


class _Socket:
    """A data socket on which a message shows up at ``ready_at`` on a fake clock."""

    def __init__(self, clock: list[float], ready_at: float, step_s: float) -> None:
        self.clock, self.ready_at, self.step_s = clock, ready_at, step_s
        self.timeouts: list[int | None] = []

    def poll(self, timeout: int | None = None, flags: int = 0) -> int:
        self.timeouts.append(timeout)
        self.clock[0] += self.step_s if timeout == 0 else (timeout or 0) / 1000
        return int(self.clock[0] >= self.ready_at)


def test_a_wait_under_a_millisecond_never_sleeps_a_whole_one() -> None:
    # zmq's poll counts whole milliseconds: a 30 us patience must not become 1 ms.
    clock = [0.0]
    sock = _Socket(clock, ready_at=1.0, step_s=5e-6)
    assert not await_message(sock, give_up=30e-6, clock=lambda: clock[0])
    assert set(sock.timeouts) == {0}
    assert clock[0] == pytest.approx(30e-6)


def test_a_sub_millisecond_wait_sees_a_message_that_comes_in_time() -> None:
    clock = [0.0]
    sock = _Socket(clock, ready_at=20e-6, step_s=5e-6)
    assert await_message(sock, give_up=100e-6, clock=lambda: clock[0])
    assert clock[0] < 30e-6


def test_longer_waits_sleep_in_poll_to_the_nearest_millisecond() -> None:
    clock = [0.0]
    sock = _Socket(clock, ready_at=1.0, step_s=5e-6)
    assert not await_message(sock, give_up=0.0024, clock=lambda: clock[0])
    assert sock.timeouts == [2]
