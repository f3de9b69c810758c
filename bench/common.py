"""Shared names of the benchmark: paths, server labels and the result records."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
TP = "torchpool (batch 16, adaptive, cap 2 ms)"
TP1 = "torchpool (batch 1)"
TP_OFF = "torchpool (batch 16, --no-elastic-cores)"
SERVER_KEYS = {
    "recipe1": RECIPE1, "recipe2": RECIPE2, "lit": LIT, "tp": TP, "tp1": TP1, "tpoff": TP_OFF
}  # fmt: skip


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
