"""Logic tier: bench/realmodels.py's answer check and its computed PASS/FAIL lines."""

from __future__ import annotations

import pytest

from bench.common import Results, Run
from bench.realmodels import RECIPE, TP, close, target_lines

pytestmark = pytest.mark.fast


def run(model: str, server: str, c: int, rps: float, p50: float, errors: int = 0) -> Run:
    return Run(model, server, c, rps, p50, p50 * 2, int(rps * 10), errors, 0)


def test_targets_compare_torchpool_with_the_recipe_at_c8() -> None:
    results = Results(started="now", machine={})
    results.runs += [
        run("text", RECIPE, 8, 100.0, 80.0),
        run("text", TP, 8, 260.0, 30.0),  # 2.6x: passes 2.5x
        run("image", RECIPE, 8, 20.0, 400.0),
        run("image", TP, 8, 29.0, 250.0),  # 1.45x: fails 1.5x
        run("text", RECIPE, 1, 90.0, 11.0),
        run("text", TP, 1, 85.0, 11.5),
    ]
    lines = target_lines(results, [1, 8])
    assert lines[0].startswith("PASS  text c=8: torchpool req/s >= 2.5x"), lines
    assert "(2.60x, 0 errors)" in lines[0]
    assert lines[1].startswith("FAIL  image c=8: torchpool req/s >= 1.5x"), lines
    assert lines[2] == "INFO  text c=1 p50: torchpool 11.50 ms, recipe 11.00 ms (+0.50 ms)"
    assert len(lines) == 3  # no image c=1 runs: no line for them


def test_a_torchpool_run_with_errors_fails_and_missing_runs_fail() -> None:
    results = Results(started="now", machine={})
    results.runs += [run("text", RECIPE, 8, 100.0, 80.0), run("text", TP, 8, 900.0, 9.0, 3)]
    lines = target_lines(results, [8])
    assert lines[0].startswith("FAIL  text c=8") and "3 errors" in lines[0]
    assert lines[1] == (
        "FAIL  image c=8: torchpool req/s >= 1.5x the one-process recipe: "
        "no data (a run is missing)"
    )


def test_answers_match_within_tolerance_and_by_structure() -> None:
    want = [[{"label": "7", "index": 7, "score": 0.5}]]
    assert close([[{"label": "7", "index": 7, "score": 0.50001}]], want)
    assert not close([[{"label": "7", "index": 7, "score": 0.6}]], want)
    assert not close([[{"label": "8", "index": 7, "score": 0.5}]], want)
    assert not close([[{"label": "7", "index": 7, "score": 0.5}], []], want)
    assert close([[0.1, 0.2]], [[0.1, 0.20005]])
    assert not close([[0.1]], [[0.1, 0.2]])
