"""Which GPUs a process sees, and what ``cuda:N`` names, the same for the gateway and a worker.

``cuda:N`` is the N-th GPU this process sees, as torch and CUDA number them:
with ``CUDA_VISIBLE_DEVICES=1,3``, ``cuda:1`` is physical GPU 3. The gateway's
placement and a remote worker's pinning both turn it into the physical index
the worker's own ``CUDA_VISIBLE_DEVICES`` then holds. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.config import ConfigError

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ: Mapping[str, str] | None = None, proc: Path = NVIDIA_PROC) -> list[int]:
    """Physical GPU indices this process sees, in CUDA's order, without importing torch."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        indices: list[int] = []
        for part in listed.split(","):
            part = part.strip()
            if not part.isdigit():
                break  # CUDA stops at the first invalid entry; UUIDs are not mapped here.
            indices.append(int(part))
        return indices
    try:
        return list(range(sum(1 for _ in proc.iterdir())))
    except OSError:
        return []


def physical_gpus(device: str, indices: Sequence[int], visible: Sequence[int]) -> list[int]:
    """The physical indices of ``cuda:N`` for each N in ``indices`` (``--device device``),
    given the ``visible`` GPUs; ConfigError naming the first that does not exist."""
    missing = [i for i in indices if i >= len(visible)]
    if missing:
        raise ConfigError(
            f"--device {device}: only {len(visible)} GPUs are visible, "
            f"so cuda:{missing[0]} does not exist"
        )
    return [visible[i] for i in indices]
