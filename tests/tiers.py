"""Keeps the fast tier honest: a test marked ``fast`` may start no process and must be quick.

The fast tier (``pytest -m fast``, ``./scripts/test --fast``) is the edit loop's:
in-process tests against fakes, the whole tier in well under a minute. A test
that starts a process (a worker, ``torchpool serve``, any subprocess) or whose
setup or body takes longer than ``fast_limit_s`` seconds fails with a message
saying so, whichever tier is being run, so a slow or real test cannot slip in
under the marker. Processes are seen through Python's audit hooks
(``subprocess.Popen``, ``os.posix_spawn``, ``os.fork``, ``os.exec``, ``os.system``),
which every way of starting one from Python passes through, asyncio's included.

Loaded by tests/conftest.py; tests/test_tiers.py checks that it catches both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Generator
from typing import Any

import pytest

# Seconds one phase (setup, call) of a fast test may take. Fast tests take
# milliseconds (the slowest, a first torch.export, about 2 s on a loaded 2-core
# machine); the wide margin keeps a busy CI machine from failing a quick test,
# and a process started by a fast test is caught however short it runs.
DEFAULT_LIMIT_S = "15"

_PROCESS_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.system",
    }
)


class _Watch:
    """What the audit hook saw while a fast test ran."""

    def __init__(self) -> None:
        self.on = False
        self.started: list[str] = []


_watch = _Watch()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watch.on and event in _PROCESS_EVENTS:
        what = args[0] if args else ""
        _watch.started.append(f"{event} {what!r}"[:200])


sys.addaudithook(_audit)  # cannot be removed; it does nothing while no fast test runs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "fast_limit_s",
        "seconds one phase (setup, call) of a test marked fast may take",
        default=DEFAULT_LIMIT_S,
    )


def _watched(item: pytest.Item, phase: str) -> Generator[None, Any, Any]:
    if item.get_closest_marker("fast") is None:
        return (yield)
    limit = float(item.config.getini("fast_limit_s"))
    _watch.started = []
    _watch.on = True
    started = time.monotonic()
    try:
        result = yield
    finally:
        _watch.on = False
    took = time.monotonic() - started
    problems = []
    if _watch.started:
        problems.append("started a process: " + "; ".join(_watch.started))
    if took > limit:
        problems.append(f"its {phase} took {took:.1f}s, over the fast tier's {limit:g}s")
    if problems:
        pytest.fail(
            "marked fast, but " + " and ".join(problems) + ": fake it, or move it to the real tier",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _watched(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _watched(item, "call"))
