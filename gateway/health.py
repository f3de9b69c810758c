"""The /health document: the pool as it is now, worker by worker.

Memory figures come from each worker's latest heartbeat (at most one interval
old); the gateway's own RSS is read on the spot.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from gateway.pool import Pool, WorkerRecord

_SELF = psutil.Process()


def pool_status(pool: Pool) -> str:
    ready = len(pool.ready_workers())
    if ready == 0:
        return "unavailable"
    return "ok" if ready == len(pool.serving()) else "degraded"


def worker_json(worker: WorkerRecord, now: float) -> dict[str, Any]:
    age = worker.heartbeat_age(now)
    document: dict[str, Any] = {
        "id": worker.slot,
        "pid": worker.pid,
        "state": worker.shown_state(),
        "device": worker.device,
        "cores": list(worker.placement.cores),
        "rss_bytes": worker.rss_bytes,
        "cuda_allocated_bytes": worker.cuda_allocated_bytes,
        "cuda_reserved_bytes": worker.cuda_reserved_bytes,
        "load_seconds": worker.load_seconds,
        "requests_served": worker.requests_served,
        "inflight": len(worker.inflight),
        "restarts": worker.restarts,
        "heartbeat_age_s": None if age is None else round(age, 3),
        "exit_code": worker.exit_code,
        "last_error": worker.last_error,
    }
    if worker.host is not None:
        document["host"] = worker.host
    return document


def health_json(pool: Pool) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "status": pool_status(pool),
        "ready_workers": len(pool.ready_workers()),
        "total_workers": len(pool.serving()),
        "gateway": {"pid": os.getpid(), "rss_bytes": _SELF.memory_info().rss},
        "workers": [worker_json(w, now) for w in pool.serving()],
    }
