"""Shared fixtures: free ports from the OS, and real `torchpool serve` processes.

Nothing here sleeps a fixed time: every wait polls a condition under a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

# tests.tiers: the fast tier's guard (a test marked fast that starts a process or is
# slow fails); pytester runs pytest on a test file of its own (tests/test_tiers.py).
pytest_plugins = ["tests.tiers", "pytester"]

ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


class Server:
    """A `torchpool serve` running as a real child process of the test."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def predict(self, payload: Any) -> httpx.Response:
        return self.client.post("/predict", json=payload)

    def health(self) -> dict[str, Any]:
        document: dict[str, Any] = self.get("/health").json()
        return document

    def live(self) -> bool:
        """True once the HTTP server answers /health/live (False while it starts)."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"torchpool serve exited with {self.proc.returncode}:\n{self.log()}"
            )
        try:
            return self.get("/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    def _ready(self, count: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"torchpool serve exited with {self.proc.returncode}:\n{self.log()}"
            )
        try:
            return bool(self.health()["ready_workers"] >= count)
        except httpx.HTTPError:
            return False

    def wait_ready(self, count: int = 1, timeout_s: float = BOOT_TIMEOUT_S) -> Server:
        wait_for(lambda: self._ready(count), timeout_s, f"{count} ready workers")
        return self

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["workers"] if w["pid"] is not None]

    def children(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.pid).children(recursive=True)
        return []

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; kill the whole tree if it does not go."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for child in self.children():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start `torchpool serve` with the given flags; every server is stopped at the end."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: int | None = 1) -> Server:
        server = Server(list(args), tmp_path / f"serve-{len(servers)}.log", env)
        servers.append(server)
        if ready:
            server.wait_ready(ready)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One demo pool of two CPU workers, shared by a module's tests."""
    server = Server(["--workers", "2"], tmp_path_factory.mktemp("demo") / "serve.log")
    try:
        server.wait_ready(2)
        yield server
    finally:
        server.stop()
