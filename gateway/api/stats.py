"""Triton's statistics extension, from the figures torchpool already keeps.

One document, Triton's ``ModelStatistics`` in its JSON form, served as
``GET /v2/models[/{name}[/versions/{v}]]/stats`` and as the gRPC
``ModelStatistics`` (parsed into the protobuf message):

    success / fail       inference requests answered, over HTTP and gRPC, and their
                         total time in the gateway (a :class:`Tally` per model, fed by
                         :meth:`gateway.api.metrics.Metrics.observe_request`)
    queue                torchpool_queue_wait_seconds: the wait before the first send
    compute_infer        the count of forward passes (torchpool does not time them: ns 0)
    inference_count      rows run, execution_count forward passes, batch_stats per
                         batch size: torchpool_batch_rows, from the workers' heartbeats
    last_inference       the wall clock of the last request answered, in ms

Durations are nanoseconds, as Triton's are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.api.metrics import Metrics
    from gateway.pool.model import ModelRuntime

_NS = 1_000_000_000


@dataclass(slots=True)
class Tally:
    """One model's inference requests, by outcome, with their summed time."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_ms: int = 0

    def add(self, seconds: float, failed: bool) -> None:
        ns = int(seconds * _NS)
        if failed:
            self.fail_count += 1
            self.fail_ns += ns
        else:
            self.success_count += 1
            self.success_ns += ns
        self.last_ms = int(time.time() * 1000)


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(seconds * _NS)}


def model_statistics(metrics: Metrics, model: ModelRuntime, version: str) -> dict[str, Any]:
    """``model``'s entry of a statistics answer (Triton's JSON names and shapes)."""
    tally = metrics.tallies.get(model.name) or Tally()
    sample = metrics.registry.get_sample_value
    labels = {"model": model.name}
    queue_count = sample("torchpool_queue_wait_seconds_count", labels) or 0.0
    queue_sum = sample("torchpool_queue_wait_seconds_sum", labels) or 0.0
    pool = model.pool
    passes = sum(pool.batch_rows.values())
    rows = sum(size * n for size, n in pool.batch_rows.items())
    return {
        "name": model.name,
        "version": version,
        "last_inference": tally.last_ms,
        "inference_count": rows,
        "execution_count": passes,
        "inference_stats": {
            "success": {"count": tally.success_count, "ns": tally.success_ns},
            "fail": {"count": tally.fail_count, "ns": tally.fail_ns},
            "queue": _duration(queue_count, queue_sum),
            "compute_input": _duration(0, 0),
            "compute_infer": _duration(passes, 0),
            "compute_output": _duration(0, 0),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(0, 0),
                "compute_infer": _duration(n, 0),
                "compute_output": _duration(0, 0),
            }
            for size, n in sorted(pool.batch_rows.items())
        ],
        "memory_usage": [],
    }
