"""Where each local worker runs: its CPU cores and, on a GPU host, its GPU.

Decided by the gateway, which sees the whole pool, and handed to each worker
as plain flags; the worker applies it to itself before torch is imported.
Nothing here touches torch: GPUs are counted from ``CUDA_VISIBLE_DEVICES`` or
the NVIDIA driver's /proc entries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.config import ConfigError, parse_device
from shared.devices import physical_gpus, visible_gpus

log = logging.getLogger("torchpool.placement")


@dataclass(frozen=True)
class Placement:
    """One worker slot: ``device`` is "cpu" or "cuda"; ``gpu`` the physical index."""

    slot: int
    device: str
    gpu: int | None
    cores: tuple[int, ...]

    @property
    def label(self) -> str:
        """The device as /health shows it: "cpu" or "cuda:<physical index>"."""
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> list[int]:
    """The cores this process may run on: its affinity (taskset, cpuset), cut
    down to its CPU quota when a cgroup sets one (Kubernetes limits without the
    static CPU manager), so workers are never given more threads than CPU time.
    """
    cores = sorted(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cpu_max)
    if quota is not None and quota < len(cores):
        cores = cores[: max(1, quota)]
    return cores


def cgroup_cpu_quota(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs allowed by cgroup v2's cpu.max (``"200000 100000"`` -> 2), if limited."""
    try:
        quota, _, period = cpu_max.read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) // int(period)


def split_cores(
    cores: Sequence[int], workers: int, per_worker: int | None = None
) -> list[tuple[int, ...]]:
    """Split ``cores`` into one disjoint set per worker.

    By default each worker gets ``len(cores) // workers`` cores; cores left over
    stay with the gateway. With more workers than cores the sets cannot be
    disjoint: each worker gets one core, round-robin, and a warning says so.
    An explicit ``per_worker`` that does not fit is an error, not a silent overlap.
    """
    if workers == 0:
        return []
    if not cores:
        raise ConfigError("no usable CPU cores")
    if per_worker is not None:
        needed = workers * per_worker
        if needed > len(cores):
            raise ConfigError(
                f"--workers {workers} x --cores-per-worker {per_worker} needs {needed} cores; "
                f"only {len(cores)} are usable ({format_cores(cores)})"
            )
        size = per_worker
    else:
        size = len(cores) // workers
    if size == 0:
        log.warning(
            "%d workers on %d cores: workers share cores, one thread each", workers, len(cores)
        )
        return [(cores[i % len(cores)],) for i in range(workers)]
    return [tuple(cores[i * size : (i + 1) * size]) for i in range(workers)]


def choose_gpus(device: str, gpus: Sequence[int] | None = None) -> list[int]:
    """The physical GPUs workers go to under ``--device`` (empty: CPU workers)."""
    spec = parse_device(device)
    available = visible_gpus() if gpus is None else list(gpus)
    if spec.kind == "cpu" or (spec.kind == "auto" and not available):
        return []
    chosen = available
    if spec.gpus is not None:
        # cuda:N is the N-th GPU this process sees (shared.devices), as for a
        # remote worker; the worker's CUDA_VISIBLE_DEVICES names its physical index.
        chosen = physical_gpus(device, spec.gpus, available)
    if not chosen:
        raise ConfigError(f"--device {device} but no GPU is visible to this process")
    return chosen


def place_another(
    existing: Sequence[Placement],
    slot: int,
    gpus: Sequence[int],
    per_worker: int | None = None,
    cores: Sequence[int] | None = None,
    taken: Sequence[int] = (),
    model: str = "",
) -> Placement:
    """Place one more worker beside ``existing`` ones (scaling up at run time).

    It gets free cores when enough are left, as many as its peers have;
    otherwise it shares the cores of an existing slot, and a warning (naming
    ``model``) says so. ``taken`` are cores other models' workers hold.
    """
    cores = usable_cores() if cores is None else list(cores)
    size = per_worker or (len(existing[0].cores) if existing else len(cores))
    used = {core for placement in existing for core in placement.cores} | set(taken)
    free = [core for core in cores if core not in used]
    if len(free) >= size:
        chosen = tuple(free[:size])
    else:
        chosen = existing[slot % len(existing)].cores if existing else tuple(cores[:size])
        log.warning(
            "no free cores for %sworker %d: it shares cores %s",
            f"{model} " if model else "",
            slot,
            format_cores(chosen),
        )
    return Placement(
        slot=slot,
        device="cuda" if gpus else "cpu",
        gpu=gpus[slot % len(gpus)] if gpus else None,
        cores=chosen,
    )


def plan(
    workers: int,
    device: str,
    per_worker: int | None = None,
    cores: Sequence[int] | None = None,
    gpus: Sequence[int] | None = None,
) -> list[Placement]:
    """Place ``workers`` local workers: disjoint core sets, GPUs round-robin."""
    cores = usable_cores() if cores is None else list(cores)
    chosen = choose_gpus(device, gpus)
    core_sets = split_cores(cores, workers, per_worker)
    return [
        Placement(
            slot=i,
            device="cuda" if chosen else "cpu",
            gpu=chosen[i % len(chosen)] if chosen else None,
            cores=core_sets[i],
        )
        for i in range(workers)
    ]


@dataclass(frozen=True)
class Demand:
    """What one model asks of the machine: ``workers`` on ``device``, maybe a core count each."""

    name: str
    workers: int
    device: str
    per_worker: int | None = None


def plan_models(
    demands: Sequence[Demand],
    cores: Sequence[int] | None = None,
    gpus: Sequence[int] | None = None,
    taken: Sequence[int] = (),
) -> dict[str, list[Placement]]:
    """Place every model's workers at once: disjoint core sets across all of them.

    One model alone is placed as :func:`plan` places it (a --cores-per-worker
    that does not fit is an error). With several, workers with an explicit
    core count get it first and the others split what is left evenly; when
    the cores run out, later workers share cores, and a warning says so (and
    /health shows the shared cores). ``taken`` are cores already in use (a
    model loaded at run time places around the running ones). GPUs are
    chosen per model from its ``device``, round-robin over its own workers.
    """
    cores = usable_cores() if cores is None else list(cores)
    if len(demands) == 1 and not taken:
        only = demands[0]
        return {only.name: plan(only.workers, only.device, only.per_worker, cores, gpus)}
    if not cores:
        raise ConfigError("no usable CPU cores")
    order = [c for c in cores if c not in set(taken)] + [c for c in cores if c in set(taken)]
    free = len(cores) - len(set(taken) & set(cores))
    explicit = sum(d.workers * d.per_worker for d in demands if d.per_worker)
    flexible = sum(d.workers for d in demands if not d.per_worker)
    even = max(1, (free - explicit) // flexible) if flexible else 0
    cursor = 0
    placed: dict[str, list[Placement]] = {}
    for demand in demands:
        chosen_gpus = choose_gpus(demand.device, gpus)
        size = demand.per_worker or even
        placements: list[Placement] = []
        for slot in range(demand.workers):
            if cursor + size <= free:
                core_set = tuple(order[cursor : cursor + size])
            else:
                core_set = tuple(order[(cursor + i) % len(order)] for i in range(size))
                log.warning(
                    "model %s worker %d shares cores %s: the usable cores (%d) ran out",
                    demand.name, slot, format_cores(core_set), len(cores),
                )  # fmt: skip
            cursor += size
            placements.append(
                Placement(
                    slot=slot,
                    device="cuda" if chosen_gpus else "cpu",
                    gpu=chosen_gpus[slot % len(chosen_gpus)] if chosen_gpus else None,
                    cores=core_set,
                )
            )
        placed[demand.name] = placements
    return placed


def shared_cores(placements: Sequence[Placement]) -> list[int]:
    """The cores that more than one of ``placements`` is pinned to."""
    seen: set[int] = set()
    shared: set[int] = set()
    for placement in placements:
        for core in placement.cores:
            (shared if core in seen else seen).add(core)
    return sorted(shared)


def format_cores(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``, as /proc/<pid>/status writes it."""
    runs: list[list[int]] = []
    for core in sorted(set(cores)):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)
