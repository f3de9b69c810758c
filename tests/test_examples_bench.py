"""Logic tier: bench/realmodels.py's answer check and its computed PASS/FAIL lines."""

from __future__ import annotations

import pytest

from bench.common import Ceiling, Results, Run
from bench.realmodels import RECIPE, TP, TP_OFF, close, schedule, target_lines

pytestmark = pytest.mark.fast


def run(model: str, server: str, c: int, rps: float, p50: float, errors: int = 0) -> Run:
    return Run(model, server, c, rps, p50, p50 * 2, int(rps * 10), errors, 0)


def verdict(lines: list[str], title: str) -> str:
    """PASS or FAIL, from the target line ``VERDICT  title: detail``."""
    found = [line[:4] for line in lines if line[6:].startswith(title + ": ")]
    assert len(found) == 1, (title, lines)
    return found[0]


def test_targets_against_the_recipe_the_ceiling_and_lending_off() -> None:
    results = Results(started="now", machine={})
    results.ceilings.append(Ceiling("image", 0, 30.0, 66.7))
    results.runs += [
        run("text", RECIPE, 1, 50.0, 20.0),
        run("text", TP, 1, 49.0, 20.5),  # 1.025x the recipe's p50: passes 1.05x
        run("image", RECIPE, 1, 14.0, 70.0),
        run("image", TP, 1, 12.0, 80.0),  # 1.14x: fails
        run("text", RECIPE, 8, 100.0, 80.0),
        run("text", TP, 8, 260.0, 30.0),  # 2.6x: passes 2.5x
        run("image", TP, 8, 26.0, 300.0),
        run("image", TP, 8, 22.0, 350.0),  # a second round: the median is the lower one
        run("image", TP, 32, 24.0, 1300.0),  # 0.8 of the ceiling: fails
        run("image", TP_OFF, 8, 27.0, 290.0),
        run("image", TP_OFF, 8, 25.0, 310.0),
    ]
    lines = target_lines(results, [8])
    assert verdict(lines, "text c=1: torchpool p50 <= 1.05x the recipe's") == "PASS"
    assert verdict(lines, "image c=1: torchpool p50 <= 1.05x the recipe's") == "FAIL"
    assert verdict(lines, "text c=8: torchpool req/s >= 2.5x the recipe") == "PASS"
    ceiling = "torchpool req/s >= 0.85x the machine's ceiling"
    assert verdict(lines, f"image c=8: {ceiling}") == "FAIL"  # the median, 22
    assert verdict(lines, f"image c=32: {ceiling}") == "FAIL"
    assert verdict(lines, "image c=32 >= c=8 (torchpool)") == "PASS"  # 24 against the median 22
    # 22 against 25, less the widest spread of either arm (26 - 22 = 4).
    on_off = "elastic cores on no slower than off (within the spread)"
    assert verdict(lines, f"image c=8: {on_off}") == "PASS"


def test_missing_runs_fail_and_name_what_is_missing() -> None:
    results = Results(started="now", machine={})
    results.runs += [run("text", RECIPE, 8, 100.0, 80.0), run("text", TP, 8, 900.0, 9.0, 3)]
    lines = target_lines(results, [8])
    assert "FAIL  text c=8: torchpool req/s >= 2.5x the recipe: 900.0 vs 100.0 (9.00x)" in lines
    assert (
        "FAIL  image c=8: elastic cores on no slower than off (within the spread): "
        "no data (a run is missing)"
    ) in lines


def test_the_torchpool_arms_alternate_round_by_round() -> None:
    order = schedule(["recipe", "on", "off"], 3)
    assert order == ["recipe", "on", "off", "off", "on", "on", "off"]


def test_answers_match_within_tolerance_and_by_structure() -> None:
    want = [[{"label": "7", "index": 7, "score": 0.5}]]
    assert close([[{"label": "7", "index": 7, "score": 0.50001}]], want)
    assert not close([[{"label": "7", "index": 7, "score": 0.6}]], want)
    assert not close([[{"label": "8", "index": 7, "score": 0.5}]], want)
    assert not close([[{"label": "7", "index": 7, "score": 0.5}], []], want)
    assert close([[0.1, 0.2]], [[0.1, 0.20005]])
    assert not close([[0.1]], [[0.1, 0.2]])
