"""How a worker process ended, in the words /health, the log and the metrics share.

The supervisor knows more than an exit status: whether it killed the worker
itself (a batch past --max-batch-seconds, missed heartbeats) or asked it to
stop (a recycle, a reload, a scale-down, the gateway stopping). A
:class:`Death` is decided once, from that knowledge and the status, and the
same record feeds the log line, ``last_error``, the slot's ``last_death`` in
/health (kept after the replacement is ready, as Kubernetes keeps a
container's ``lastState``) and the ``worker_deaths`` metric's ``cause`` label.

Only a SIGKILL the supervisor did not send is "killed from outside": the
kernel's OOM killer is the usual sender, and where the cgroup's
``memory.events`` counted a new ``oom_kill`` it is named for certain.
"""

from __future__ import annotations

import datetime
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.pool.process import ProcessHandle
from gateway.pool.workers import DeathCause, State, WorkerRecord
from shared import protocol

# Causes of deaths nobody planned, the ``worker_deaths`` metric's labels: signal
# (not our SIGKILL), exit, load_failed, heartbeat (hung: killed), hello_timeout,
# unreachable, batch_timeout (killed), killed_outside (a SIGKILL we did not send),
# oom (one the cgroup's memory.events counts).
UNPLANNED = tuple(cause.value for cause in DeathCause)
# Ends the supervisor asked for: shown in /health and the log, not counted as deaths.
PLANNED = ("recycle", "reload", "scale_down", "shutdown")

OUTSIDE_SIGKILL = (
    "killed from outside (SIGKILL); the kernel's OOM killer does this when memory runs out"
)
OOM_SIGKILL = "killed by the kernel's OOM killer (SIGKILL): memory ran out (cgroup memory.events)"


@dataclass(frozen=True, slots=True)
class Death:
    """One worker process's end: why, how (exit code or signal), and when."""

    cause: str  # one of UNPLANNED or PLANNED
    reason: str  # in words, e.g. "its batch ran longer than 3 s (--max-batch-seconds)"
    exit_code: int | None = None  # negative: killed by that signal
    at: float = 0.0  # time.time()

    @property
    def planned(self) -> bool:
        return self.cause in PLANNED

    @property
    def signal(self) -> str | None:
        return (
            signal_name(-self.exit_code)
            if self.exit_code is not None and self.exit_code < 0
            else None
        )

    def to_json(self) -> dict[str, Any]:
        when = datetime.datetime.fromtimestamp(self.at, datetime.timezone.utc)
        return {
            "cause": self.cause,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int) -> str:
    """Say how a process ended from its status alone (negative: killed by that signal)."""
    if code >= 0:
        return f"exited with code {code}"
    return f"killed by {signal_name(-code)}"


def from_status(code: int, we_killed: bool, oom_killed: bool) -> tuple[str, str]:
    """(cause, reason) of an exit nobody planned, from its status and what we know.

    ``we_killed``: the supervisor sent the SIGKILL; ``oom_killed``: the cgroup
    counted an OOM kill since the last look.
    """
    if code == -signal.SIGKILL and not we_killed:
        return ("oom", OOM_SIGKILL) if oom_killed else ("killed_outside", OUTSIDE_SIGKILL)
    if code < 0:
        return "signal", describe_exit(code)
    if code == protocol.EXIT_LOAD_FAILED:
        return "load_failed", describe_exit(code)  # the worker's ERROR said why
    return "exit", describe_exit(code)


class OomCounter:
    """The cgroup v2 ``oom_kill`` count of this process's cgroup, to tell OOM kills apart.

    Workers run in the gateway's cgroup (unless something moves them), so a
    count that went up since the last look means the kernel's OOM killer
    struck in it. Where there is no cgroup v2 file, nothing is claimed.
    """

    def __init__(self, events: Path | None = None) -> None:
        self._events = events if events is not None else _own_memory_events()
        self._seen = self._read()

    def new_kills(self) -> bool:
        """Whether the count went up since the last call (or since this was made)."""
        now = self._read()
        if now is None or self._seen is None:
            self._seen = now
            return False
        grew = now > self._seen
        self._seen = now
        return grew

    def _read(self) -> int | None:
        if self._events is None:
            return None
        try:
            text = self._events.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None


def _own_memory_events() -> Path | None:
    """``memory.events`` of this process's cgroup (v2 only), if readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events"
            return path if path.exists() else None
    return None


HELLO_TIMEOUT_S = 30.0  # a fresh interpreter must say hello within this
BOOT_SLACK_S = 10.0  # least heartbeat silence tolerated from a booting worker


def silence(worker: WorkerRecord, now: float, allowed: float) -> tuple[str, DeathCause] | None:
    """How a worker silent past its limit is declared lost, or None while it is not.

    ``allowed`` is --heartbeat-s times --heartbeat-liveness. Importing torch and
    loading a model can starve the heartbeat thread of the GIL for a while, so
    booting workers get more slack; one that never said hello gets its own limit.
    """
    age = worker.heartbeat_age(now)
    limit = allowed if worker.state is State.READY else max(allowed, BOOT_SLACK_S)
    if age is not None and age > limit:
        return f"sent no heartbeat for {age:.1f}s (hung); killed", DeathCause.HEARTBEAT
    if age is None and now - (worker.spawned_at or now) > HELLO_TIMEOUT_S:
        return f"did not say hello within {HELLO_TIMEOUT_S:.0f}s", DeathCause.HELLO_TIMEOUT
    return None


def death_note(worker: WorkerRecord, process: ProcessHandle, how: str) -> str:
    """``last_error`` for a death: how it died, and the last line it wrote to stderr."""
    tail = [line for line in process.stderr_tail if line.strip()]
    note = f"worker {worker.slot} {how}"
    return f"{note}: {tail[-1]}" if tail else note
