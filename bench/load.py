"""Load and CPU measurement: wrk runs and their parsing, process-tree CPU, the quiet gate."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import psutil

from bench.common import LUA
from bench.servers import Server, tree

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    def number(pattern: str, default: float | None = None) -> float:
        match = re.search(pattern, output)
        if match is None:
            if default is None:
                raise ValueError(f"no {pattern!r} in wrk's output:\n{output}")
            return default
        return float(match.group(1))

    percentiles = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests_per_s": number(r"Requests/sec:\s+([\d.]+)"),
        "requests": number(r"(\d+) requests in"),
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        "non_2xx": number(r"Non-2xx or 3xx responses: (\d+)", 0.0),
        "socket_errors": float(sum(int(n) for n in socket_errors.groups()))
        if socket_errors
        else 0.0,
    }


def wrk_argv(concurrency: int, seconds: float, url: str, script: Path = LUA) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def wrk(
    concurrency: int,
    seconds: float,
    url: str,
    body_file: Path,
    script: Path = LUA,
    env: dict[str, str] | None = None,
) -> str:
    result = subprocess.run(
        wrk_argv(concurrency, seconds, url, script),
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": str(body_file), **(env or {})},
        timeout=seconds + 30,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (steal included)."""
    times = psutil.cpu_times()
    return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0)


def tree_cpu_seconds(server: Server) -> tuple[float, float]:
    """CPU seconds used so far by the server's whole tree, and by its parent process alone."""
    total = parent = 0.0
    for proc in tree(server):
        with contextlib.suppress(psutil.Error):
            cpu = proc.cpu_times()
            total += cpu.user + cpu.system
            if server.proc is not None and proc.pid == server.proc.pid:
                parent = cpu.user + cpu.system
    return total, parent


def own_cpu_seconds(server: Server) -> float:
    """CPU seconds used by the server's tree, this driver and its reaped children (wrk)."""
    total = 0.0
    for proc in tree(server):
        with contextlib.suppress(psutil.Error):
            cpu = proc.cpu_times()
            total += cpu.user + cpu.system
    mine = os.times()
    return total + mine.user + mine.system + mine.children_user + mine.children_system


def other_load(server: Server, seconds: float) -> float:
    """Cores used by processes other than ours, on average over the next ``seconds``."""
    busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
    time.sleep(seconds)
    busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


class QuietGate:
    """Waits, within a time budget, until other jobs on the machine leave it alone.

    Other processes on a shared machine (a test suite, say) steal CPU from the
    servers and from wrk and make any comparison noise. Before each measured run
    the gate waits until they use under ``limit`` cores; the whole run spends
    at most ``budget_s`` waiting, and each run at most ``per_run_s``.
    """

    def __init__(self, limit: float, budget_s: float, per_run_s: float) -> None:
        self.limit = limit
        self.budget_s = budget_s
        self.per_run_s = per_run_s
        self.waited_s = 0.0

    def wait(self, server: Server) -> float:
        """The last reading of other load (cores), after waiting as long as allowed."""
        start = time.monotonic()
        deadline = start + min(self.per_run_s, max(0.0, self.budget_s - self.waited_s))
        reading = other_load(server, 0.5)
        while reading > self.limit and time.monotonic() < deadline:
            reading = other_load(server, 0.5)
        self.waited_s += time.monotonic() - start
        return reading


# --- the report -----------------------------------------------------------------------
