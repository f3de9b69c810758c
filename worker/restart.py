"""``torchpool worker --restart``: a remote worker that brings itself back.

A local worker has the gateway to replace it; a remote one has only its host.
With ``--restart`` the command runs the worker as a child process (the same
command line, less ``--restart``) and starts it again when it exits, by the
gateway's own rule (:mod:`shared.restarts`): at once after a worker that had
been ready, after an exponential backoff when it died booting, and never
again after MAX_BOOT_FAILURES such deaths in a row. A child that cannot load
its model before it was ever ready (exit code 3), or whose settings cannot
work (2), is not restarted: that needs an operator.

The child tells this process it is ready by writing one byte to a pipe
(:data:`worker.main.READY_FD_ENV`). A child that hangs in its forward pass
ends itself (``--max-batch-seconds``), and is then restarted like any other.

SIGTERM or SIGINT (or SIGHUP) is passed on to the child, which finishes what
it holds and exits; then this process exits 0 and starts nothing more.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Final

from shared import protocol
from shared.restarts import backoff_s, given_up
from worker.main import PROG, READY_FD_ENV

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How often the wait loop looks at the child while nothing happens (it is also
# woken at once by the ready pipe and by a stop signal's wakeup byte).
_POLL_S: Final = 0.5


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line without ``--restart``: the child is the worker itself."""
    return [arg for arg in argv if arg != "--restart" and not arg.startswith("--restart=")]


class Supervisor:
    """Runs the worker child, again and again, until told to stop or given up."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._argv = child_argv(argv)
        self._env = {k: v for k, v in os.environ.items() if k != "TORCHPOOL_RESTART"}
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.boot_failures = 0
        self.ever_ready = False

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record, pass it on, and wake the wait loop: no work in a handler.
        self._stopping = True
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        """Start, wait, restart; the exit status (0 after a stop signal)."""
        while not self._stopping:
            code, ready = self._run_once()
            if self._stopping:
                break
            if ready:
                self.ever_ready = True
                self.boot_failures = 0
            else:
                self.boot_failures += 1
            how = _describe(code)
            if code == protocol.EXIT_BAD_CONFIG or (
                code == protocol.EXIT_LOAD_FAILED and not self.ever_ready
            ):
                _say(f"the worker {how}; restarting cannot fix that, so it is not restarted")
                return code
            if given_up(self.boot_failures):
                _say(
                    f"the worker {how}, its {self.boot_failures}th death in a row before it "
                    "was ready; not restarting it"
                )
                return code if code > 0 else 1
            delay = backoff_s(self.boot_failures)
            _say(f"the worker {how}; restarting it" + (f" in {delay:.1f}s" if delay else ""))
            self._sleep(delay)
        _say("stopped")
        return 0

    def _run_once(self) -> tuple[int, bool]:
        """One child, from start to exit: (its exit status, whether it said it was ready)."""
        ready_r, ready_w = os.pipe()
        env = {**self._env, READY_FD_ENV: str(ready_w)}
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "worker", *self._argv], env=env, pass_fds=(ready_w,)
            )
        finally:
            os.close(ready_w)
        _say(f"worker started: pid {self._child.pid}")
        ready = False
        try:
            while self._child.poll() is None:
                waiting = [self._wake_r] if ready else [self._wake_r, ready_r]
                readable, _, _ = select.select(waiting, [], [], _POLL_S)
                if ready_r in readable:
                    ready = os.read(ready_r, 1) == b"r" or ready
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
            return self._child.returncode, ready
        finally:
            os.close(ready_r)

    def _sleep(self, seconds: float) -> None:
        """Wait out a backoff; a stop signal ends it at once."""
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._wake_r], [], [], left)
            if readable:
                os.read(self._wake_r, 64)


def supervise(argv: Sequence[str]) -> int:
    supervisor = Supervisor(argv)
    supervisor.install()
    return supervisor.run()


def _describe(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _say(text: str) -> None:
    print(f"{PROG} --restart: {text}", file=sys.stderr, flush=True)
