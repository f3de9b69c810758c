"""Pin a worker to its cores and GPU before torch is imported.

OpenMP, MKL and CUDA read their settings once, when the library loads, so
:func:`apply` must run before the first ``import torch`` in the process;
:func:`configure_torch` finishes the job once torch is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from shared import protocol
from shared.config import parse_device
from shared.devices import physical_gpus, visible_gpus


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
    With ``elastic`` (a CPU worker that may borrow idle cores) OpenMP's idle
    threads sleep instead of spinning, unless ``OMP_WAIT_POLICY`` is set
    already: measured with ``bench/lendprobe.py`` on 2 cores, a lent pass of
    384x384 products ran 0.60x as fast as no lend with the default spinning
    wait and 0.99x with PASSIVE; of 1024x1024, 0.94x against 1.47x.
    """
    host = tuple(sorted(os.sched_getaffinity(0)))
    if cores:
        os.sched_setaffinity(0, cores)
    pinned = tuple(sorted(os.sched_getaffinity(0)))
    threads = len(pinned)
    for name in protocol.THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    kind, physical = choose_gpu(device, gpu)
    if elastic and kind == "cpu":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if physical is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(physical)
    return Pinning(pinned, threads, physical, kind, host)


def configure_torch(threads: int) -> None:
    """Set torch's thread pools; call right after torch is imported."""
    import torch

    torch.set_num_threads(threads)
    # Inter-op parallelism would oversubscribe the pinned cores; one pool is enough.
    # RuntimeError: already set, or parallel work already started; it stays fixed.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
