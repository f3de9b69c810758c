"""The /health document: every model and every worker as they are now.

Memory figures come from each worker's latest heartbeat (at most one interval
old); the gateway's own is read on the spot. PSS is the number to add up: RSS
counts the weights that workers share once in every worker. The top-level counts cover
all models; ``models`` has one entry per model, and every worker names its
model. ``shared_cores`` lists cores pinned to more than one worker (placement
ran out of free cores), empty when every worker has its own.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from gateway.pool.placement import shared_cores
from gateway.pool.workers import Pool, WorkerRecord

if TYPE_CHECKING:
    from gateway.pool.model import ModelRuntime
    from gateway.pool.runtime import Runtime

_SELF = psutil.Process()


def gateway_memory() -> dict[str, int | None]:
    """The gateway's own RSS and PSS (with its private and shared parts), read now."""
    rss = int(_SELF.memory_info().rss)
    try:
        info = _SELF.memory_full_info()
    except (psutil.AccessDenied, AttributeError):
        return {"rss_bytes": rss, "pss_bytes": None, "private_bytes": None}
    return {"rss_bytes": rss, "pss_bytes": int(getattr(info, "pss", 0)), "private_bytes": info.uss}


def pool_status(pool: Pool) -> str:
    return _status(len(pool.ready_workers()), len(pool.serving()))


def _status(ready: int, total: int) -> str:
    if ready == 0:
        return "unavailable"
    return "ok" if ready == total else "degraded"


def worker_json(worker: WorkerRecord, now: float) -> dict[str, Any]:
    age = worker.heartbeat_age(now)
    document: dict[str, Any] = {
        "id": worker.slot,
        "model": worker.model,
        "pid": worker.pid,
        "state": worker.shown_state(),
        "device": worker.device,
        "cores": list(worker.placement.cores),
        # Intra-op threads of its last forward pass: more than len(cores) when
        # that pass borrowed idle workers' cores (docs/elastic-cores.md).
        "threads": worker.threads,
        "rss_bytes": worker.rss_bytes,
        "pss_bytes": worker.pss_bytes,
        "private_bytes": worker.private_bytes,
        "shared_pss_bytes": worker.shared_pss_bytes,
        "weights": worker.weights,
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


def model_json(model: ModelRuntime) -> dict[str, Any]:
    pool = model.pool
    return {
        "name": model.name,
        "state": model.state.value,
        "ready_workers": len(pool.ready_workers()),
        "total_workers": len(pool.serving()),
        "min_ready": model.settings.min_ready,
        "fingerprint": model.fingerprint,
        "device": model.settings.device,
        "error": model.error,
        "refused_workers": list(model.refused.values()),
    }


def health_json(runtime: Runtime, models: list[ModelRuntime] | None = None) -> dict[str, Any]:
    """The whole gateway, or only ``models`` (the admin API's answer about one)."""
    now = time.monotonic()
    chosen = list(runtime.models.values()) if models is None else models
    workers = [w for model in chosen for w in model.pool.serving()]
    ready = sum(1 for w in workers if w.ready)
    # Local slots only: a successor borrows its slot's cores on purpose.
    placements = [w.placement for model in runtime.models.values() for w in model.pool.workers]
    return {
        "status": _status(ready, len(workers)),
        "ready_workers": ready,
        "total_workers": len(workers),
        "gateway": {"pid": os.getpid(), **gateway_memory()},
        "models": [model_json(m) for m in chosen],
        "shared_cores": shared_cores(placements),
        "workers": [worker_json(w, now) for w in workers],
    }
