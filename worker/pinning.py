"""Pin a worker to its cores and GPU before torch is imported.

OpenMP, MKL and CUDA read their settings once, when the library loads, so
:func:`apply` must run before the first ``import torch`` in the process;
:func:`configure_torch` finishes the job once torch is imported.

One exception: a worker with elastic cores is pinned only after the import.
GNU OpenMP counts the cores it may use once, when it loads, from the
process's CPU mask; a process pinned to one core then takes every pass with
more threads for an oversubscribed one, and its threads stop spinning after
a thousand turns and sleep between parallel regions. A lent pass then paid a
futex wake-up per operation: ResNet-18 ran 36-46 ms on two threads against
25-29 ms when OpenMP had loaded seeing both cores (1 thread: 46-51 ms).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from shared import protocol
from shared.config import parse_device
from shared.devices import physical_gpus, visible_gpus

# GOMP_SPINCOUNT for elastic workers: tens of microseconds of spinning (libgomp's
# default is 300,000, or 1,000 when it counts more threads than cores). Served
# ResNet-18 at one request at a time: p50 39 ms with 10,000 against 55-60 ms with
# 100,000 (and one round of two connections had a p99 of 552 ms) and
# 62-65 ms without lending.
ELASTIC_SPINCOUNT: Final = 10_000


@dataclass(frozen=True)
class Pinning:
    """What a worker was pinned to: its cores, thread count and device."""

    cores: tuple[int, ...]
    threads: int
    # Physical GPU index the worker owns, or None on CPU (and for a plain
    # "cuda" without an index, which uses whatever is visible).
    gpu: int | None
    # "cpu", "cuda" or "auto"; auto is resolved once torch is imported.
    kind: str
    # Every core the process could run on before it was pinned: the most a
    # pass may spread over when it borrows idle workers' cores.
    host: tuple[int, ...] = ()
    # Whether the CPU mask is still to be set, by configure_torch (elastic cores).
    deferred: bool = False

    @property
    def label(self) -> str:
        """The device as the gateway shows it: ``cpu``, ``cuda:1`` (physical index), ``auto``."""
        if self.kind == "cuda":
            return f"cuda:{self.gpu if self.gpu is not None else 0}"
        return self.kind


def choose_gpu(
    device: str, gpu: int | None, visible: Sequence[int] | None = None
) -> tuple[str, int | None]:
    """Device kind and physical GPU from ``--device`` and ``--gpu``.

    The gateway hands local workers ``--gpu``, a physical index. A remote worker
    given ``--device cuda:2`` (or ``cuda:2,3``) takes the first listed: the N-th
    GPU it sees (``visible``, default :func:`shared.devices.visible_gpus`), as the
    gateway's placement reads ``cuda:N``. ConfigError when there is no such GPU.
    """
    spec = parse_device(device)
    if gpu is not None:
        return ("cuda" if spec.kind != "cpu" else "cpu"), (gpu if spec.kind != "cpu" else None)
    if spec.kind == "cuda" and spec.gpus:
        seen = visible_gpus() if visible is None else visible
        return "cuda", physical_gpus(device, spec.gpus[:1], seen)[0]
    return spec.kind, None


def apply(
    cores: Sequence[int] | None,
    device: str = "cpu",
    gpu: int | None = None,
    elastic: bool = False,
) -> Pinning:
    """Pin this process; return what it was pinned to.

    ``cores`` None keeps the current affinity (every usable core). The thread
    variables are set to the number of cores so torch's pools match the pin.
    ConfigError when ``device`` names a GPU this process does not see.

    With ``elastic`` (a CPU worker that may borrow idle cores) the CPU mask
    is set by :func:`configure_torch`, after OpenMP has loaded seeing every
    core (see the module docstring), and OpenMP's idle threads spin for
    :data:`ELASTIC_SPINCOUNT` turns before they sleep, unless
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set already: long enough to
    stay awake between the operations of one pass, short enough that a
    thread narrowed back after a lent pass stops spinning within a
    millisecond. Measured with ``bench/lendprobe.py``; docs/elastic-cores.md
    has the table.
    """
    host = tuple(sorted(os.sched_getaffinity(0)))
    kind, physical = choose_gpu(device, gpu)
    deferred = bool(elastic and kind == "cpu" and cores)
    if cores and not deferred:
        os.sched_setaffinity(0, cores)
    pinned = tuple(sorted(cores)) if deferred and cores else tuple(sorted(os.sched_getaffinity(0)))
    threads = len(pinned)
    for name in protocol.THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    if elastic and kind == "cpu" and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = str(ELASTIC_SPINCOUNT)
    if physical is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(physical)
    return Pinning(pinned, threads, physical, kind, host, deferred)


def pin_every_thread(cores: Sequence[int]) -> None:
    """Set the CPU mask of every thread of this process (those started before the pin too)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def configure_torch(pin: Pinning) -> None:
    """Set torch's thread pools, and a deferred CPU mask; call right after torch is imported."""
    import torch

    if pin.deferred:
        pin_every_thread(pin.cores)
    threads = pin.threads
    torch.set_num_threads(threads)
    # Inter-op parallelism would oversubscribe the pinned cores; one pool is enough.
    # RuntimeError: already set, or parallel work already started; it stays fixed.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
