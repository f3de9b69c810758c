"""Real tier: remote workers over TCP with CurveZMQ, across network namespaces.

The gateway runs in the test's own namespace; remote workers run in a network
namespace the test creates (``ip netns`` + a veth pair) and removes. Traffic
stays between those two ends of the veth pair.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server, wait_for

ROW = [0.5] * 16
FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Namespace:
    name: str
    gateway_ip: str
    worker_ip: str


@pytest.fixture
def netns() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = secrets.token_hex(3)
    name, host_end, ns_end = f"tpw-{tag}", f"tpg{tag}", f"tpw{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    space = Namespace(name, f"10.231.{octet}.1", f"10.231.{octet}.2")
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", ns_end, "netns", name)
        sh("ip", "addr", "add", f"{space.gateway_ip}/30", "dev", host_end)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{space.worker_ip}/30", "dev", ns_end)
        sh("ip", "netns", "exec", name, "ip", "link", "set", ns_end, "up")
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "netns", "del", name)
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        yield space
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "netns", "del", name)  # removes the veth pair with it
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "link", "del", host_end)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("server", "good", "stranger"):
        sh(str(Path(sys.executable).parent / "torchpool"), "keys", name, "--dir", str(tmp_path))
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(tmp_path / "good.key", allow / "good.key")
    return tmp_path


class RemoteWorkers:
    def __init__(self, space: Namespace, log_dir: Path) -> None:
        self.space = space
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, endpoint: str, secret: Path, server_key: Path) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"remote-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [
                "ip", "netns", "exec", self.space.name,
                sys.executable, "-m", "worker", "--connect", endpoint,
                "--curve-secret", str(secret), "--curve-server-key", str(server_key),
                "--heartbeat-s", "0.2",
            ],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def remote(netns: Namespace, tmp_path: Path) -> Iterator[RemoteWorkers]:
    workers = RemoteWorkers(netns, tmp_path)
    try:
        yield workers
    finally:
        workers.stop()


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def test_only_admitted_keys_join_and_serve(
    serve: Callable[..., Server], netns: Namespace, keys: Path, remote: RemoteWorkers
) -> None:
    endpoint = f"tcp://{netns.gateway_ip}:{free_port_on(netns.gateway_ip)}"
    server = serve(
        "--workers", "0", "--bind", endpoint,
        "--curve-secret", str(keys / "server.key_secret"), "--curve-allow", str(keys / "allow"),
        *FAST_BEATS, ready=None,
    )  # fmt: skip
    wait_for(server.live, 30, "the gateway")
    assert server.get("/health/ready").status_code == 503
    stranger = remote.start(endpoint, keys / "stranger.key_secret", keys / "server.key")
    good = remote.start(endpoint, keys / "good.key_secret", keys / "server.key")
    # A worker with the right key but the wrong idea of the server's key fails too.
    impostor = remote.start(endpoint, keys / "good.key_secret", keys / "stranger.key")
    server.wait_ready(1, timeout_s=90)
    health = server.health()
    assert health["total_workers"] == 1
    joined = health["workers"][0]
    assert joined["pid"] == good.pid  # same PID namespace; only the network is separate
    assert joined["host"] and joined["id"] >= 1000
    for _ in range(10):
        response = server.predict({"input_tensor": [ROW]})
        assert response.status_code == 200, response.text
    assert server.health()["workers"][0]["requests_served"] >= 10
    # The others are up (their processes run) but were never admitted. Watch a
    # few heartbeat intervals to be sure none of them slips in.
    assert stranger.poll() is None and impostor.poll() is None
    watch_until = time.monotonic() + 3.0
    while time.monotonic() < watch_until:
        assert server.health()["total_workers"] == 1
        time.sleep(0.1)


def test_silent_remote_worker_is_dropped_and_comes_back(
    serve: Callable[..., Server], netns: Namespace, keys: Path, remote: RemoteWorkers
) -> None:
    endpoint = f"tcp://{netns.gateway_ip}:{free_port_on(netns.gateway_ip)}"
    server = serve(
        "--workers", "1", "--bind", endpoint,
        "--curve-secret", str(keys / "server.key_secret"), "--curve-allow", str(keys / "allow"),
        *FAST_BEATS, ready=1,
    )  # fmt: skip
    worker = remote.start(endpoint, keys / "good.key_secret", keys / "server.key")
    server.wait_ready(2, timeout_s=90)
    os.kill(worker.pid, signal.SIGSTOP)
    wait_for(
        lambda: any(w["state"] == "stopped" for w in server.health()["workers"]),
        10,
        "the silent remote worker to be dropped",
    )
    for _ in range(5):
        assert server.predict({"input_tensor": [ROW]}).status_code == 200
    os.kill(worker.pid, signal.SIGCONT)
    server.wait_ready(2, timeout_s=30)


def test_tcp_beyond_loopback_needs_curve_or_an_explicit_opt_out(netns: Namespace) -> None:
    endpoint = f"tcp://{netns.gateway_ip}:{free_port_on(netns.gateway_ip)}"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", "0", "--workers", "0", "--bind", endpoint],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--curve-secret" in result.stderr and "--insecure-tcp" in result.stderr
