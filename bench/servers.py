"""The servers under test: how each starts, is checked, measured for memory and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from bench import models
from bench.common import (
    HOST,
    LIT,
    MB,
    READY_DEADLINE_S,
    RECIPE1,
    RECIPE2,
    ROOT,
    STOP_GRACE_S,
    TOLERANCE,
    TP,
    TP1,
    TP_OFF,
    VENV_BIN,
    Memory,
)


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
        # The A/B arm of elastic cores (docs/elastic-cores.md): tp with lending off.
        "tpoff": Server(
            "tpoff",
            TP_OFF,
            [
                *torchpool,
                "--max-batch-size",
                "16",
                "--max-batch-delay-ms",
                "2",
                "--no-elastic-cores",
                "--port",
                "{port}",
            ],
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
