"""Real tier: stopping is stopping.

A terminal's Ctrl-C signals the whole foreground process group, and harnesses
often signal the group and then every pid. From the first SIGTERM/SIGINT the
gateway is stopping: it spawns nothing more, a worker that exits on its own
signal is part of the stop (no ERROR, no replacement), and a second signal
may hasten the stop but never restarts anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Server, wait_for
from tests.load import Load

DRAIN_S = 5.0
# The test's bound on a stop, from the first signal to the exit: the drain time
# plus one second, as promised. The second signal cuts the drain short, so a
# stop normally takes well under a second or two; the margin is for a shared
# machine, not for the gateway.
STOP_BOUND_S = DRAIN_S + 1.0


def signal_quietly(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@pytest.mark.parametrize(
    ("sig", "loaded"),
    [(sig, loaded) for loaded in (False, True) for sig in (signal.SIGTERM, signal.SIGINT)],
    ids=["sigterm-idle", "sigint-idle", "sigterm-load", "sigint-load"],
)
def test_a_double_signal_to_the_group_and_every_process_stops_cleanly(
    tmp_path: Path, sig: signal.Signals, loaded: bool
) -> None:
    server = Server(
        ["--workers", "2", "--drain-timeout-s", str(DRAIN_S), "--heartbeat-s", "0.2"],
        tmp_path / "serve.log",
        new_session=True,
    )
    try:
        server.wait_ready(2)
        workers = set(server.worker_pids())
        assert len(workers) == 2
        load = Load(server.url, threads=4, limit_s=60) if loaded else None
        with load or contextlib.nullcontext():
            if load is not None:
                wait_for(lambda: load.answered > 20, 30, "load to flow")
            started = time.monotonic()
            os.killpg(server.pid, sig)  # the first: the group (the gateway alone in it)
            # Then the group and every process, at once: the workers hear it directly.
            os.killpg(server.pid, sig)
            for pid in workers:
                signal_quietly(pid, sig)
            seen: set[int] = set()

            def exited() -> bool:
                # Every child the gateway has while it stops; a replacement would show here.
                seen.update(child.pid for child in server.children())
                return server.proc.poll() is not None

            wait_for(exited, 60, "the gateway to exit", interval_s=0.01)
            elapsed = time.monotonic() - started
        log = server.log()
        assert server.proc.returncode == 0, log
        assert seen <= workers, f"spawned during the stop: {seen - workers}\n{log}"
        assert log.count("spawned: pid") == 2, log  # the two first workers only
        worker_errors = [line for line in log.splitlines() if " ERROR " in line]
        assert worker_errors == [], "\n".join(worker_errors)
        assert elapsed < STOP_BOUND_S, f"took {elapsed:.1f}s\n{log}"
        for pid in workers:
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, f"worker {pid} gone")  # noqa: B023
    finally:
        server.stop()
