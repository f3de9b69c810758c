"""Fast tier: the soak report's arithmetic and verdicts (bench/soak_report.py)."""

from __future__ import annotations

import pytest

from bench.common import MB
from bench.soak_report import Outcomes, Process, Sample, Soak, markdown

pytestmark = pytest.mark.fast


def soak(growth_mb_per_hour: float, rest_after: tuple[int, int], outcomes: Outcomes) -> Soak:
    proc = Process("gateway", 1, rest_before=(20, 5), rest_after=rest_after)
    for i in range(60):  # 10 minutes, a sample every 10 s
        t_s = i * 10.0
        rss = int((50 + growth_mb_per_hour * t_s / 3600) * MB)
        proc.samples.append(Sample(t_s, rss, 20, 5))
    return Soak(10, 60, 1, 4, 20, 10, "now", "here", [proc], outcomes, load_s=600)


def test_slope_is_mb_per_hour_past_the_warm_up() -> None:
    proc = soak(12.0, (20, 5), Outcomes()).processes[0]
    slope = proc.slope_mb_per_hour(60)
    assert slope is not None and abs(slope - 12.0) < 0.1


def test_a_clean_run_passes_and_each_fault_fails_it() -> None:
    clean = Outcomes()
    clean.record("valid", "200")
    clean.record("bad_json", "400", "bad_request")
    clean.record("hangup_mid_body", "hung up")
    assert soak(1.0, (20, 5), clean).passed()
    assert not soak(6.0, (20, 5), clean).passed()
    assert not soak(1.0, (20, 6), clean).passed()
    broken = Outcomes()
    broken.record("valid", "503", "unavailable")
    broken.record("wrong_shape", "ReadTimeout")
    assert [key for key, _ in broken.unexpected()] == [
        ("valid", "503", "unavailable"),
        ("wrong_shape", "ReadTimeout", ""),
    ]
    report = markdown(soak(1.0, (20, 5), broken))
    assert "(FAIL)" in report and "valid -> 503 unavailable (1)" in report
