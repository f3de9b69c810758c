"""Real tier: a remote worker polices itself.

``--max-batch-seconds`` on ``torchpool worker`` ends a worker whose forward
pass hangs, from inside (a watchdog that needs no GIL), and ``--restart``
brings it back by the gateway's own rule: at once after a worker that was
ready, with growing backoff after one that died booting, and not at all after
MAX_BOOT_FAILURES such deaths in a row.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared.restarts import MAX_BOOT_FAILURES, backoff_s
from tests.conftest import ROOT, Server, free_port, wait_for

FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")
ROW = [0.5] * 16


@pytest.fixture
def remote_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``python -m worker ARGS``; its stderr goes to ``worker.log``; stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "worker.log").open("wb")

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], cwd=ROOT, stderr=log, stdout=log
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log.close()


def remote_pid(server: Server) -> int | None:
    ready = [w for w in server.health()["workers"] if w["state"] in ("ready", "busy")]
    return int(ready[0]["pid"]) if ready else None


def test_a_hung_remote_worker_ends_itself_and_comes_back(
    serve: Callable[..., Server],
    remote_worker: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    model = ("--handler", "tests.zoo:HangHandler")
    # The gateway's own limit is far off: the worker must police itself.
    server = serve(
        *model, "--workers", "0", "--bind", endpoint, "--max-batch-seconds", "600", *FAST_BEATS,
        ready=None,
    )  # fmt: skip
    supervisor = remote_worker(
        "--connect", endpoint, *model, "--max-batch-seconds", "1", "--restart",
        "--heartbeat-s", "0.2",
    )  # fmt: skip
    server.wait_ready(1)
    first = remote_pid(server)
    assert first is not None
    # A forward pass stuck in a Python loop: only the worker's watchdog ends it.
    with pytest.raises(httpx.HTTPStatusError):
        server.predict({"input_tensor": [[-1.0] * 16]}).raise_for_status()
    back = wait_for(
        lambda: (pid := remote_pid(server)) not in (None, first) and pid, 90, "a new worker"
    )
    assert server.predict({"input_tensor": [ROW]}).status_code == 200
    assert supervisor.poll() is None  # the supervising process lives on
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Timeout (0:00:01)!" in log  # faulthandler's dump: the stuck stack is in the log
    assert "HangHandler" in log or "zoo.py" in log
    assert re.search(r"--restart: the worker exited with code 1; restarting it\n", log), log
    assert back != first


def test_a_remote_worker_dying_on_boot_is_restarted_with_backoff_then_given_up(
    remote_worker: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # No gateway is needed: the worker dies loading, before it talks to anyone.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = remote_worker(
        "--connect", endpoint, "--handler", "tests.zoo:DiesBootingHandler", "--restart"
    )
    code = proc.wait(180)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    delays = [float(d) for d in re.findall(r"restarting it in ([0-9.]+)s", log)]
    assert delays == [backoff_s(n) for n in range(1, MAX_BOOT_FAILURES)], log
    assert log.count("worker started: pid") == MAX_BOOT_FAILURES
    assert "not restarting it" in log and code == 1


def test_a_stop_signal_stops_the_supervisor_and_its_worker(
    remote_worker: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = remote_worker("--connect", endpoint, "--restart")
    log_path = tmp_path / "worker.log"
    match = wait_for(
        lambda: re.search(r"worker started: pid (\d+)", log_path.read_text()), 60, "the child"
    )
    child = int(match.group(1))
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_for(lambda: not Path(f"/proc/{child}").exists(), 30, "the child to exit")
    assert log_path.read_text().count("worker started: pid") == 1  # nothing restarted
