"""The Procfile: its process types, and `honcho start web` serving for real.

Only the `web` type is started: it is the whole server (gateway and local
pool). The `worker` type joins a gateway over TCP and is checked for shape
only here; remote workers have their own tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sysconfig
from pathlib import Path

import httpx
import psutil

from tests.conftest import BOOT_TIMEOUT_S, ROOT, free_port, gone, wait_for

PROCFILE = ROOT / "Procfile"
SCRIPTS = Path(sysconfig.get_path("scripts"))
# honcho answers SIGTERM with 128 + 15 once every process it ran has stopped.
HONCHO_SIGTERM_EXIT = 143


def process_types() -> dict[str, str]:
    types: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if match:
            types[match.group(1)] = match.group(2)
    return types


def test_procfile_declares_web_and_worker() -> None:
    types = process_types()
    assert set(types) == {"web", "worker"}
    web = types["web"].split()
    # exec: the platform signals and watches the process it started. Without
    # exec that is the shell, which ends by the SIGTERM (honcho saw rc=-15)
    # instead of passing on the gateway's clean exit status.
    assert web[:3] == ["exec", "torchpool", "serve"]
    # The platform's $PORT; the host may be narrowed, as the test below does.
    assert web[web.index("--port") + 1] == "$PORT"
    assert web[web.index("--host") + 1] == "${TORCHPOOL_HOST:-0.0.0.0}"
    worker = types["worker"].split()
    assert worker[:3] == ["exec", "torchpool", "worker"]
    assert worker[worker.index("--connect") + 1] == '"$TORCHPOOL_CONNECT"'


def test_honcho_accepts_the_procfile() -> None:
    result = subprocess.run(
        [str(SCRIPTS / "honcho"), "check", "-f", str(PROCFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_honcho_web_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    no_dotenv = tmp_path / "empty.env"
    no_dotenv.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPOOL_")}
    env.update(
        PATH=f"{SCRIPTS}{os.pathsep}{env.get('PATH', '')}",
        PORT=str(port),
        TORCHPOOL_HOST="127.0.0.1",
        TORCHPOOL_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "honcho.log"
    with log_path.open("wb") as log:
        honcho = subprocess.Popen(
            [
                str(SCRIPTS / "honcho"),
                "start",
                "--no-colour",
                "-f",
                str(PROCFILE),
                "-d",
                str(ROOT),
                "-e",
                str(no_dotenv),
                "web",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: dict[int, psutil.Process] = {}

    def ready() -> bool:
        if honcho.poll() is not None:
            raise AssertionError(f"honcho exited with {honcho.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update((p.pid, p) for p in psutil.Process(honcho.pid).children(recursive=True))
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, BOOT_TIMEOUT_S, "honcho's web process to be ready")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["total_workers"] == 1  # TORCHPOOL_WORKERS reached torchpool
        workers = [w["pid"] for w in health["workers"]]
        seen.update((p.pid, p) for p in psutil.Process(honcho.pid).children(recursive=True))
        commands = [" ".join(p.cmdline()) for p in seen.values()]
        assert any("torchpool serve" in c and f"--port {port}" in c for c in commands), commands

        honcho.send_signal(signal.SIGTERM)
        assert honcho.wait(60) == HONCHO_SIGTERM_EXIT, log_path.read_text()
        # honcho reports how the web process ended: the gateway's own clean exit.
        assert re.search(r"web\.1\s+\|? ?stopped \(rc=0\)", log_path.read_text()), (
            log_path.read_text()
        )
        for pid in [*seen, *workers]:
            wait_for(functools.partial(gone, pid), 10.0, f"process {pid} to exit")
    finally:
        if honcho.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
        for process in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
