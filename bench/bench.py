"""torchpool against its peers, side by side on this machine: throughput, latency, memory.

Run through ``bench/run.sh`` (which prepares ``bench/.venv`` and wrk), or directly:

    bench/.venv/bin/python -m bench.bench [--duration 8] [--models heavy,small] [--servers ...]

For each model x server x concurrency: a short warm-up, then one measured
``wrk`` run against 127.0.0.1. Every server is checked for the right numbers
before it is measured, and its whole process tree is measured for memory after
its runs. Writes ``bench/RESULTS.md`` and raw JSON under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import torch

from bench import models

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
LUA = BENCH / "post.lua"
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
TOLERANCE = 1e-4
READY_DEADLINE_S = 180.0
STOP_GRACE_S = 15.0
MB = 1024 * 1024

# The server labels, in the order the tables show them.
RECIPE1 = "recipe (1 uvicorn process)"
RECIPE2 = "recipe (uvicorn --workers 2)"
LIT = "LitServe 0.2.19 (2 workers, batch 16)"
TP = "torchpool (batch 16, 2 ms)"
TP1 = "torchpool (batch 1)"
SERVER_KEYS = {"recipe1": RECIPE1, "recipe2": RECIPE2, "lit": LIT, "tp": TP, "tp1": TP1}


# --- results ------------------------------------------------------------------------


@dataclass
class Run:
    """One measured wrk run."""

    model: str
    server: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    # Cores kept busy by processes other than this server, wrk and the driver,
    # on average during the measured run (other jobs sharing the machine).
    other_load: float = 0.0
    # CPU time the server's whole process tree, and its parent (torchpool's gateway)
    # alone, spent per answered request: robust to other load, unlike req/s.
    cpu_ms_per_request: float = 0.0
    parent_cpu_ms_per_request: float = 0.0
    raw: str = field(repr=False, default="")

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass
class Memory:
    model: str
    server: str
    processes: int
    rss_mb: float
    pss_mb: float
    parent_rss_mb: float


@dataclass
class Ceiling:
    model: str
    batch: int
    rows_per_s: float
    ms_per_forward: float


@dataclass
class Results:
    started: str
    machine: dict[str, str]
    commands: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    ceilings: list[Ceiling] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def run(self, model: str, server: str, concurrency: int) -> Run | None:
        for run in self.runs:
            if (run.model, run.server, run.concurrency) == (model, server, concurrency):
                return run
        return None

    def mem(self, model: str, server: str) -> Memory | None:
        for memory in self.memory:
            if (memory.model, memory.server) == (model, server):
                return memory
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the machine ----------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    versions = {}
    for name in ("litserve", "fastapi", "uvicorn", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "nproc": str(os.cpu_count()),
        "usable cores": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?",
        **versions,
    }


# --- the in-process ceiling -----------------------------------------------------------


def ceiling(name: str, model: torch.nn.Module, batch: int, seconds: float = 1.0) -> Ceiling:
    """Rows per second of ``model``'s forward on one thread at ``batch`` rows."""
    x = torch.rand(batch, models.MODELS[name].inputs)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        count = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            model(x)
            count += 1
    return Ceiling(name, batch, count * batch / elapsed, elapsed * 1000 / count)


# --- servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


@dataclass
class Server:
    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[Server], bool]
    source: Path = ROOT  # the working directory: where gateway/, worker/, bench/ are imported from
    port: int = 0
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def ready_torchpool(server: Server) -> bool:
    with contextlib.suppress(OSError, ValueError):
        status, body = http("GET", server.url + "/health", timeout=2)
        return status == 200 and json.loads(body).get("ready_workers") == 2
    return False


def ready_litserve(server: Server) -> bool:
    with contextlib.suppress(OSError):
        return http("GET", server.url + "/health", timeout=2)[0] == 200
    return False


def ready_uvicorn(workers: int) -> Callable[[Server], bool]:
    """Every uvicorn worker has run its lifespan (the model is loaded) and it answers."""

    def ready(server: Server) -> bool:
        if server.log_text().count("Application startup complete.") < workers:
            return False
        with contextlib.suppress(OSError):
            return http("GET", server.url + "/docs", timeout=2)[0] == 200
        return False

    return ready


class ServerFailed(Exception):
    """A server could not start; the run goes on without it and the report says so."""


def server_specs(
    name: str, weights: Path, keys: Sequence[str], source: Path = ROOT
) -> list[Server]:
    python = str(VENV_BIN / "python")
    model_env = {"BENCH_MODEL": name, "BENCH_WEIGHTS": str(weights)}
    # One torch thread per worker process everywhere.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    uvicorn = [python, "-m", "uvicorn", "bench.peers.recipe:app", "--host", HOST]
    uvicorn_tail = ["--no-access-log", "--log-level", "info"]
    # From another source tree, ``python -m gateway`` (which is ``torchpool serve``) run
    # there imports that tree's code instead of the editable install's.
    head = [python, "-m", "gateway"] if source != ROOT else [str(VENV_BIN / "torchpool"), "serve"]
    torchpool = [
        *head,
        "--workers",
        "2",
        "--model",
        str(weights),
        "--model-class",
        f"bench.models:{models.MODELS[name].__name__}",
        "--input-shape",
        str(models.MODELS[name].inputs),
        "--host",
        HOST,
        "--log-level",
        "warning",
    ]
    specs = {
        "recipe1": Server(
            "recipe1",
            RECIPE1,
            [*uvicorn, *uvicorn_tail, "--port", "{port}"],
            {**model_env, **threads},
            ready_uvicorn(1),
        ),
        "recipe2": Server(
            "recipe2",
            RECIPE2,
            [*uvicorn, "--workers", "2", *uvicorn_tail, "--port", "{port}"],
            {**model_env, **threads},
            ready_uvicorn(2),
        ),
        "lit": Server(
            "lit",
            LIT,
            [
                python,
                *("-m", "bench.peers.lit", "--model", name, "--weights", str(weights)),
                *("--max-batch-size", "16", "--batch-timeout", "0.002", "--port", "{port}"),
            ],
            threads,
            ready_litserve,
        ),
        "tp": Server(
            "tp",
            TP,
            [*torchpool, "--max-batch-size", "16", "--max-batch-delay-ms", "2", "--port", "{port}"],
            {},
            ready_torchpool,
        ),
        "tp1": Server(
            "tp1",
            TP1,
            [*torchpool, "--max-batch-size", "1", "--port", "{port}"],
            {},
            ready_torchpool,
        ),
    }
    for spec in specs.values():
        spec.source = source
    return [specs[key] for key in keys]


def start(server: Server, logs: Path, model: str) -> None:
    server.port = free_port()
    server.log = logs / f"{model}-{server.key}.log"
    argv = [part.replace("{port}", str(server.port)) for part in server.argv]
    with server.log.open("wb") as log:
        server.proc = subprocess.Popen(
            argv,
            cwd=server.source,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **server.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerFailed(
                f"{server.label} exited with {server.proc.returncode} while starting:\n"
                + server.log_text()[-3000:]
            )
        if server.ready(server):
            return
        time.sleep(0.1)
    stop(server)
    raise ServerFailed(
        f"{server.label} was not ready within {READY_DEADLINE_S:g}s:\n" + server.log_text()[-3000:]
    )


def tree(server: Server) -> list[psutil.Process]:
    if server.proc is None:
        return []
    try:
        parent = psutil.Process(server.proc.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def memory(server: Server, model: str) -> Memory:
    procs = tree(server)
    rss = pss = 0
    parent_rss = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            pss += info.pss
            if server.proc is not None and proc.pid == server.proc.pid:
                parent_rss = info.rss
    return Memory(model, server.label, len(procs), rss / MB, pss / MB, parent_rss / MB)


def stop(server: Server) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever is left of its tree."""
    proc = server.proc
    if proc is None:
        return
    procs = tree(server)  # torchpool's workers sit in their own sessions: track them by pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for survivor in alive:
        with contextlib.suppress(psutil.Error):
            survivor.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    server.proc = None


@contextlib.contextmanager
def running(server: Server, logs: Path, model: str) -> Iterator[Server]:
    try:
        start(server, logs, model)
        yield server
    finally:
        stop(server)


# --- correctness and load -------------------------------------------------------------


def check_answer(server: Server, body: bytes, expected: list[list[float]]) -> None:
    status, answer = http("POST", server.url + "/predict", body, timeout=30)
    if status != 200:
        raise SystemExit(f"{server.label}: POST /predict answered {status}: {answer[:500]!r}")
    got = torch.tensor(json.loads(answer)["prediction"], dtype=torch.float64)
    want = torch.tensor(expected, dtype=torch.float64)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=TOLERANCE):
        raise SystemExit(
            f"{server.label} gave different numbers from the in-process model:\n"
            f"  got  {got.tolist()}\n  want {want.tolist()}"
        )


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


def wrk_argv(concurrency: int, seconds: float, url: str) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        url,
    ]


def wrk(concurrency: int, seconds: float, url: str, body_file: Path) -> str:
    result = subprocess.run(
        wrk_argv(concurrency, seconds, url),
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": str(body_file)},
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


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


@dataclass
class Target:
    name: str
    passed: bool
    detail: str


def targets(results: Results) -> list[Target]:
    out: list[Target] = []

    def get(model: str, server: str, c: int) -> Run | None:
        return results.run(model, server, c)

    def clean(*runs: Run | None) -> bool:
        return all(r is not None and r.errors == 0 for r in runs)

    tp, lit, uv2 = get("heavy", TP, 64), get("heavy", LIT, 64), get("heavy", RECIPE2, 64)
    if tp and lit and uv2:
        out.append(
            Target(
                "heavy c=64: torchpool req/s >= 2x LitServe",
                tp.requests_per_s >= 2 * lit.requests_per_s and clean(tp),
                f"{tp.requests_per_s:.0f} vs {lit.requests_per_s:.0f} "
                f"({_ratio(tp.requests_per_s, lit.requests_per_s)})",
            )
        )
        out.append(
            Target(
                "heavy c=64: torchpool req/s >= 3x uvicorn --workers 2",
                tp.requests_per_s >= 3 * uv2.requests_per_s and clean(tp),
                f"{tp.requests_per_s:.0f} vs {uv2.requests_per_s:.0f} "
                f"({_ratio(tp.requests_per_s, uv2.requests_per_s)})",
            )
        )
        out.append(
            Target(
                "heavy c=64: torchpool p99 lower than LitServe's and uvicorn --workers 2's",
                tp.p99_ms < lit.p99_ms and tp.p99_ms < uv2.p99_ms and clean(tp),
                f"{tp.p99_ms:.1f} ms vs {lit.p99_ms:.1f} ms (LitServe), "
                f"{uv2.p99_ms:.1f} ms (uvicorn --workers 2)",
            )
        )
    tp, lit, uv1 = get("small", TP, 64), get("small", LIT, 64), get("small", RECIPE1, 64)
    if tp and lit and uv1:
        out.append(
            Target(
                "small c=64: torchpool req/s >= one-process recipe",
                tp.requests_per_s >= uv1.requests_per_s and clean(tp),
                f"{tp.requests_per_s:.0f} vs {uv1.requests_per_s:.0f} "
                f"({_ratio(tp.requests_per_s, uv1.requests_per_s)})",
            )
        )
        out.append(
            Target(
                "small c=64: torchpool req/s >= 2.4x LitServe",
                tp.requests_per_s >= 2.4 * lit.requests_per_s and clean(tp),
                f"{tp.requests_per_s:.0f} vs {lit.requests_per_s:.0f} "
                f"({_ratio(tp.requests_per_s, lit.requests_per_s)})",
            )
        )
    for model in ("heavy", "small"):
        tp, uv1 = get(model, TP, 1), get(model, RECIPE1, 1)
        if tp and uv1:
            out.append(
                Target(
                    f"{model} c=1: torchpool p50 <= recipe p50 + 0.3 ms",
                    tp.p50_ms <= uv1.p50_ms + 0.3 and clean(tp),
                    f"{tp.p50_ms:.2f} ms vs {uv1.p50_ms:.2f} ms (+{tp.p50_ms - uv1.p50_ms:.2f} ms)",
                )
            )
    for model in ("heavy", "small"):
        mem = results.mem(model, TP)
        if mem:
            out.append(
                Target(
                    f"{model}: torchpool gateway RSS < 80 MB",
                    mem.parent_rss_mb < 80,
                    f"{mem.parent_rss_mb:.1f} MB",
                )
            )
        uv2m = results.mem(model, RECIPE2)
        if mem and uv2m:
            out.append(
                Target(
                    f"{model}: torchpool total PSS <= uvicorn --workers 2's",
                    mem.pss_mb <= uv2m.pss_mb,
                    f"{mem.pss_mb:.0f} MB vs {uv2m.pss_mb:.0f} MB",
                )
            )
    expected = [
        "heavy c=64: torchpool req/s >= 2x LitServe",
        "heavy c=64: torchpool req/s >= 3x uvicorn --workers 2",
        "heavy c=64: torchpool p99 lower than LitServe's and uvicorn --workers 2's",
        "small c=64: torchpool req/s >= one-process recipe",
        "small c=64: torchpool req/s >= 2.4x LitServe",
        "heavy c=1: torchpool p50 <= recipe p50 + 0.3 ms",
        "small c=1: torchpool p50 <= recipe p50 + 0.3 ms",
        "heavy: torchpool gateway RSS < 80 MB",
        "heavy: torchpool total PSS <= uvicorn --workers 2's",
        "small: torchpool gateway RSS < 80 MB",
        "small: torchpool total PSS <= uvicorn --workers 2's",
    ]
    have = {target.name for target in out}
    out += [
        Target(name, False, "no data (a run is missing)") for name in expected if name not in have
    ]
    return out


def report(results: Results, concurrencies: Sequence[int]) -> str:
    lines = [
        "# torchpool benchmark results",
        "",
        f"Run of {results.started} (UTC), {results.seconds / 60:.1f} minutes, written by "
        "`bench/run.sh` (`bench/bench.py`). Raw numbers: `bench/out/results.json`; every "
        "wrk output and server log: `bench/out/`.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in results.machine.items()]
    lines += [
        "",
        "**The load generator (wrk, one thread) shares these cores with the servers**: "
        "on a 2-core machine every server competes with wrk for CPU, so absolute numbers "
        "are lower than on a dedicated box; the comparison is fair because every server "
        "pays the same.",
        "",
        "## Commands",
        "",
        "Every server: two workers/processes and one torch thread per process "
        "(`OMP_NUM_THREADS=1` and `torch.set_num_threads(1)` in the peers; torchpool pins "
        "each worker to one core and sets the same by itself). Ports are free ports "
        "found at run time (`PORT`); `W` is the model's state_dict in `bench/out/weights/`.",
        "",
    ]
    for label, command in results.commands.items():
        lines.append(f"- {label}: `{command}`")
    lines += [
        "",
        "Each server x concurrency: a 2 s wrk warm-up at that concurrency, then the "
        "measured run. Before measuring, one answer is checked against the model run "
        f"in-process (abs tol {TOLERANCE:g}). Bodies are one row of JSON "
        '(`{"input_tensor": [[...]]}`), `content-type: application/json`.',
        "",
    ]
    lines += [f"- {note}" for note in results.notes]
    for model in ("heavy", "small"):
        shape = "512->3072->3072->10" if model == "heavy" else "16->32->4"
        lines += [
            "",
            f"## {model} (MLP {shape})",
            "",
            "Ratios: torchpool (batch 16, 2 ms) at the same concurrency against the row's "
            "server (req/s: higher is better for torchpool; p99: lower is better). "
            "other load: cores used by processes outside the benchmark during the run "
            "(0 on a quiet machine). CPU ms/req: CPU time of the server's whole process "
            "tree per answered request (in brackets: its parent process alone, which for "
            "torchpool is the gateway); unlike req/s it barely moves with other load.",
            "",
            "| server | c | req/s | p50 ms | p99 ms | errors | tp req/s ratio | tp p99 ratio "
            "| CPU ms/req (parent) | other load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for concurrency in concurrencies:
            tp = results.run(model, TP, concurrency)
            for label in SERVER_KEYS.values():
                run = results.run(model, label, concurrency)
                if run is None:
                    continue
                ratios = ("", "")
                if tp is not None and label != TP:
                    ratios = (
                        _ratio(tp.requests_per_s, run.requests_per_s),
                        _ratio(tp.p99_ms, run.p99_ms),
                    )
                lines.append(
                    f"| {label} | {concurrency} | {run.requests_per_s:,.0f} | "
                    f"{run.p50_ms:.2f} | {run.p99_ms:.2f} | {run.errors} | "
                    f"{ratios[0]} | {ratios[1]} | {run.cpu_ms_per_request:.3f} "
                    f"({run.parent_cpu_ms_per_request:.3f}) | {run.other_load:.2f} |"
                )
    lines += [
        "",
        "## Memory (whole process tree, after the server's runs)",
        "",
        "| model | server | processes | total RSS MB | total PSS MB | parent/gateway RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mem in results.memory:
        lines.append(
            f"| {mem.model} | {mem.server} | {mem.processes} | {mem.rss_mb:.0f} | "
            f"{mem.pss_mb:.0f} | {mem.parent_rss_mb:.1f} |"
        )
    lines += [
        "",
        "## In-process ceiling (the model's forward alone, one thread, no HTTP)",
        "",
        "| model | batch | ms per forward | rows/s, 1 process | rows/s, x2 processes |",
        "|---|---:|---:|---:|---:|",
    ]
    for ceil in results.ceilings:
        lines.append(
            f"| {ceil.model} | {ceil.batch} | {ceil.ms_per_forward:.3f} | "
            f"{ceil.rows_per_s:,.0f} | {2 * ceil.rows_per_s:,.0f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "Computed from the numbers above (a torchpool run with errors fails its target).",
        "",
        "```",
    ]
    for target in targets(results):
        lines.append(f"{'PASS' if target.passed else 'FAIL'}  {target.name}: {target.detail}")
    lines += ["```", ""]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------


def measure(
    server: Server,
    name: str,
    body: bytes,
    expected: list[list[float]],
    body_file: Path,
    concurrencies: Sequence[int],
    args: argparse.Namespace,
    gate: QuietGate,
    results: Results,
) -> None:
    """Start ``server``, check its numbers, run wrk at each concurrency, take its memory."""
    out: Path = args.out
    logs = out / "logs"
    with running(server, logs, name):
        check_answer(server, body, expected)
        url = server.url + "/predict"
        for concurrency in concurrencies:
            gate.wait(server)
            wrk(concurrency, args.warmup, url, body_file)
            busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            tree0, parent0 = tree_cpu_seconds(server)
            output = wrk(concurrency, args.duration, url, body_file)
            tree1, parent1 = tree_cpu_seconds(server)
            busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
            (out / f"wrk-{name}-{server.key}-c{concurrency}.txt").write_text(output)
            parsed = parse_wrk(output)
            run = Run(
                name,
                server.label,
                concurrency,
                parsed["requests_per_s"],
                parsed["p50_ms"],
                parsed["p99_ms"],
                int(parsed["requests"]),
                int(parsed["non_2xx"]),
                int(parsed["socket_errors"]),
                round(other, 2),
                1000 * (tree1 - tree0) / max(1, parsed["requests"]),
                1000 * (parent1 - parent0) / max(1, parsed["requests"]),
                output,
            )
            results.runs.append(run)
            print(
                f"   c={concurrency:<3} {run.requests_per_s:9.0f} req/s  "
                f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
                f"errors {run.errors}  other load {run.other_load:.2f} cores  "
                f"cpu/req {run.cpu_ms_per_request:.3f} ms "
                f"(parent {run.parent_cpu_ms_per_request:.3f})",
                flush=True,
            )
        results.memory.append(memory(server, name))
        print(f"   memory {results.memory[-1]}", flush=True)


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--models", default="heavy,small")
    parser.add_argument("--servers", default=",".join(SERVER_KEYS))
    parser.add_argument(
        "--quiet-limit",
        type=float,
        default=0.25,
        help="before each run, wait until other processes use fewer cores than this",
    )
    parser.add_argument(
        "--quiet-budget", type=float, default=150.0, help="most seconds spent waiting in all"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="run the servers from this copy of the tree (e.g. an export of git HEAD)",
    )
    parser.add_argument("--source-label", default="", help="what --source is, for the report")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model_names = args.models.split(",")
    keys = args.servers.split(",")
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    gate = QuietGate(args.quiet_limit, args.quiet_budget, per_run_s=20.0)
    torch.set_num_threads(1)
    results = Results(
        started=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(),
    )
    results.notes.append(
        "uvicorn runs with `--no-access-log` (torchpool logs no access lines either); "
        "LitServe with `log_level='warning'`, `access_log=False`, uvloop and httptools."
    )
    results.notes.append(
        "LitServe: `fast_queue=True` is passed as documented, but 0.2.19 builds its "
        "`TransportConfig(transport_config=...)` with a misspelt keyword (the field is "
        "`transport_type`), so replies still travel over its multiprocessing Manager queues."
    )
    label = args.source_label
    if not label:
        described = subprocess.run(
            ["git", "-C", str(args.source), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
        label = f"git {described.stdout.strip() or '?'} at {args.source}"
    results.machine["torchpool source"] = label
    print(f"machine: {results.machine}", flush=True)
    for name in model_names:
        weights = models.save(name, out / "weights")
        model = models.build(name)
        for batch in (1, 16):
            results.ceilings.append(ceiling(name, model, batch))
            print(f"ceiling {results.ceilings[-1]}", flush=True)
    for name in model_names:
        weights = out / "weights" / f"{name}.pt"
        model = models.build(name)
        row = models.example_row(name)
        with torch.inference_mode():
            expected: list[list[float]] = model(torch.tensor(row)).tolist()
        body_file = out / f"body-{name}.json"
        body = json.dumps({"input_tensor": row}).encode()
        body_file.write_bytes(body)
        for server in server_specs(name, weights, keys, args.source):
            command = (
                shlex.join(server.argv).replace(str(weights), "W").replace(str(ROOT) + "/", "")
            )
            results.commands.setdefault(
                server.label, command.replace("'{port}'", "PORT").replace("{port}", "PORT")
            )
            print(f"== {name} / {server.label}", flush=True)
            try:
                measure(server, name, body, expected, body_file, concurrencies, args, gate, results)
            except ServerFailed as exc:
                print(f"   FAILED: {exc}", flush=True)
                results.notes.append(
                    f"{name} / {server.label} could not be measured: "
                    + str(exc).splitlines()[0]
                    + f" (log: bench/out/logs/{name}-{server.key}.log)"
                )
            results.seconds = time.monotonic() - began
            (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    results.commands["wrk"] = (
        shlex.join(wrk_argv(64, args.duration, "http://127.0.0.1:PORT/predict"))
        .replace(str(ROOT) + "/", "")
        .replace("-c64", "-cC")
        + "  (BENCH_BODY=bench/out/body-MODEL.json)"
    )
    results.seconds = time.monotonic() - began
    noisy = sum(1 for run in results.runs if run.other_load > args.quiet_limit)
    results.notes.append(
        f"Other jobs on the machine: before each run the driver waited (at most 20 s per "
        f"run, {args.quiet_budget:g} s in all; {gate.waited_s:.0f} s spent) for other "
        f"processes to use under {args.quiet_limit:g} cores. {noisy} of {len(results.runs)} "
        "runs still had more (see the other load column); treat those rows with care."
    )
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    text = report(results, concurrencies)
    args.results.write_text(text)
    print(text[text.index("## Targets") :], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
