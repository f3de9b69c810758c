"""Real tier: the fast tier's guard (tests/tiers.py) fails a fast test that starts a
process or is slow, and leaves every other test alone.

Runs pytest in a child process on a file of tests written here, so that the
processes those tests start are not this test's own.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

CASES = """
import asyncio
import subprocess
import sys
import time

import pytest

PROGRAM = [sys.executable, "-c", "pass"]


@pytest.mark.fast
def test_fast_and_quick():
    assert sum(range(10)) == 45


@pytest.mark.fast
def test_fast_but_runs_a_subprocess():
    subprocess.run(PROGRAM, check=True)


@pytest.mark.fast
def test_fast_but_spawns_through_asyncio():
    async def spawn():
        process = await asyncio.create_subprocess_exec(*PROGRAM)
        await process.wait()

    asyncio.run(spawn())


@pytest.mark.fast
def test_fast_but_slow():
    time.sleep(0.5)  # the slowness under test, over the 0.2 s limit given below


def test_real_runs_a_subprocess_and_takes_its_time():
    subprocess.run(PROGRAM, check=True)
    time.sleep(0.5)
"""


def test_the_guard_fails_fast_tests_that_start_processes_or_are_slow(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess(
        "-p",
        "tests.tiers",
        "-o",
        "fast_limit_s=0.2",
        "-W",
        "ignore::pytest.PytestUnknownMarkWarning",
    )
    result.assert_outcomes(passed=2, failed=3)
    output = result.stdout.str()
    # Which tests failed, by name only: the summary line's message is cut to the
    # terminal's width, so a word of the message may or may not be on it.
    failed = re.findall(r"^FAILED test_cases\.py::(\w+)", output, flags=re.MULTILINE)
    assert sorted(failed) == [
        "test_fast_but_runs_a_subprocess",
        "test_fast_but_slow",
        "test_fast_but_spawns_through_asyncio",
    ], output
    assert "marked fast, but started a process: subprocess.Popen" in output
    assert re.search(r"marked fast, but its call took \d+\.\ds, over the fast tier's 0.2s", output)
    assert "fake it, or move it to the real tier" in output
