"""The chaos soak (bench/chaos_soak.py): its verdicts (fast), and a 2-minute run (real).

The real run is the CI version of the 20-minute soak recorded in
bench/RESULTS.md: two models (a batched MLP on 2 workers, a streaming handler
on 1), predict, v2 and SSE clients, a SIGKILL every 7 s, a SIGSTOP every 30 s
and a reload every 40 s. Every target must hold.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.chaos_report import ChaosSoak, GatewaySample, Tally, markdown
from bench.chaos_soak import run
from bench.common import MB


def result(tally: Tally, rss_growth_mb: float = 0.0, exit_code: int = 0) -> ChaosSoak:
    samples = [
        GatewaySample(t, int((60 + (rss_growth_mb if t >= 30 else 0)) * MB), 30, 8)
        for t in range(0, 120, 5)
    ]
    return ChaosSoak(2, 30, "now", "here", "cmd", tally, samples, exit_code, 1.0)


@pytest.mark.fast
def test_a_clean_run_passes_and_each_broken_target_fails_it() -> None:
    clean = Tally()
    clean.note("predict", "200")
    assert result(clean).passed()
    assert not result(clean, rss_growth_mb=40).passed()
    assert not result(clean, exit_code=1).passed()
    for broken in ("wrong", "hung", "violations", "unended"):
        tally = Tally()
        getattr(tally, broken).append("x")
        report = markdown(result(tally))
        assert not result(tally).passed() and "**FAIL**" in report


def test_two_minutes_of_chaos_meet_every_target() -> None:
    soak = asyncio.run(run(minutes=2, clients=6, sse_clients=2, rate=60, seed=19))
    print("\n" + markdown(soak))
    assert soak.tally.chaos["SIGKILL"] >= 10 and soak.tally.chaos["SIGSTOP"] >= 2
    assert soak.tally.total("predict") and soak.tally.total("v2") and soak.tally.total("sse")
    failed = [(name, measured) for name, ok, measured in soak.verdicts() if not ok]
    assert failed == [], (failed, soak.tally.violations[:5], soak.tally.unended[:5])
