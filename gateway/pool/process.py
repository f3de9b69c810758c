"""A thin handle on one worker process: spawn, signal, wait, and its stderr tail.

Workers are always fresh interpreters (``python -m worker``), never forks of
the gateway, and run in their own session so that a Ctrl-C in the terminal
reaches only the gateway, which then stops them in order. They die with the
gateway through PR_SET_PDEATHSIG, set up on their side.

The supervisor knows a worker only as a ``ProcessHandle`` made by a
``Spawner``; ``WorkerProcess.spawn`` is the real one, and tests give it fakes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.pool.placement import Placement, format_cores
from shared import protocol
from shared.config import ENV_PREFIX, PoolSettings
from shared.flags import worker_argv

log = logging.getLogger("torchpool.worker")

STDERR_TAIL_LINES = 20


class ProcessHandle(Protocol):
    """What the supervisor does with a worker process."""

    @property
    def pid(self) -> int: ...

    @property
    def stderr_tail(self) -> Sequence[str]:
        """The process's last lines on stderr, oldest first."""
        ...

    @property
    def killed_by_us(self) -> bool:
        """Whether this handle has sent the process SIGKILL (so a SIGKILL death is ours)."""
        ...

    def is_alive(self) -> bool: ...

    def exit_status(self) -> int | None:
        """The status if the process has ended, reaped or not (without reaping it)."""
        ...

    def kill(self) -> None: ...

    async def wait(self) -> int:
        """Reap the process and return its exit status (negative: killed by a signal)."""
        ...

    async def stop(self, grace_s: float) -> int:
        """Ask, wait ``grace_s``, then kill; always reap."""
        ...


class Spawner(Protocol):
    """Starts ``python -m worker`` with ``argv`` and ``env``; ``label`` names it in logs."""

    async def __call__(
        self, argv: Sequence[str], env: Mapping[str, str], label: str
    ) -> ProcessHandle: ...


class WorkerProcess:
    """One spawned worker: signal it, wait for it, read its last stderr lines."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self._proc = proc
        self.label = label
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.killed_by_us = False
        self._pump = asyncio.get_running_loop().create_task(self._forward_stderr())

    @classmethod
    async def spawn(cls, argv: Sequence[str], env: Mapping[str, str], label: str) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
        return cls(proc, label)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def is_alive(self) -> bool:
        return self._proc.returncode is None

    def exit_status(self) -> int | None:
        if self._proc.returncode is not None:
            return self._proc.returncode
        # WNOWAIT leaves the zombie for asyncio's child watcher to reap.
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None  # reaped meanwhile: wait() has the status
        if info is None or info.si_pid == 0:
            return None
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -info.si_status
        return info.si_status

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.exit_status() is None:  # a zombie's SIGKILL would not be ours
            self.killed_by_us = True
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def wait(self) -> int:
        """Reap the process and return its exit status (negative: killed by a signal)."""
        code = await self._proc.wait()
        # Let the stderr pump read what the process wrote last; it ends at EOF.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), timeout=1.0)
        return code

    async def stop(self, grace_s: float) -> int:
        """Ask (SIGTERM), wait ``grace_s``, then kill; always reap."""
        self.terminate()
        try:
            return await asyncio.wait_for(self.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.1fs; killing it", self.label, grace_s)
            self.kill()
            return await self.wait()

    async def _forward_stderr(self) -> None:
        """Copy the worker's stderr to ours, line by line, keeping the last lines."""
        stream = self._proc.stderr
        if stream is None:
            return
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            sys.stderr.write(f"[{self.label}] {text}\n")


def command_line(
    settings: PoolSettings, placement: Placement, endpoint: str, uid: str, slot: int
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a local worker for ``placement``.

    Everything a local worker needs is on its command line; the gateway's own
    TORCHPOOL_* settings (--curve-secret, say) must not leak into it. The
    thread variables are set for torch's sake before the worker imports it.
    """
    settings = dataclasses.replace(
        settings,
        device=placement.device,
        model=os.path.abspath(settings.model) if settings.model else None,
    )
    argv = [
        *worker_argv(settings),
        "--connect", endpoint,
        "--uid", uid,
        "--slot", str(slot),
        "--cores", format_cores(placement.cores),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({name: str(len(placement.cores)) for name in protocol.THREAD_ENV_VARS})
    if placement.gpu is not None:
        argv += ["--gpu", str(placement.gpu)]
        env["CUDA_VISIBLE_DEVICES"] = str(placement.gpu)
    return argv, env
