"""Live memory figures for heartbeats and READY, measured on every call.

The control thread samples memory at each heartbeat, so figures are never
older than one heartbeat. CUDA figures come from a probe the main thread
installs once torch and the device are up: the control thread must not import
torch itself (it would wait on the import lock while the main thread imports
torch, and stall heartbeats for the whole import).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil

# () -> (allocated bytes, reserved bytes) on the worker's CUDA device.
CudaProbe = Callable[[], tuple[int, int]]


class MemorySampler:
    """Reads this process's RSS, and CUDA memory once a probe is installed."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._cuda_probe: CudaProbe | None = None

    def install_cuda_probe(self, probe: CudaProbe) -> None:
        self._cuda_probe = probe

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def proportional(self) -> dict[str, int | None]:
        """PSS and its parts: pages only this process maps (USS) and its share of the rest.

        RSS counts a page shared by N workers N times; PSS counts 1/N of it in
        each, so the PSS of every process adds up to the memory really used.
        """
        try:
            info = self._process.memory_full_info()
        except (psutil.AccessDenied, AttributeError):
            return {"pss_bytes": None, "private_bytes": None, "shared_pss_bytes": None}
        pss = int(getattr(info, "pss", 0))
        uss = int(info.uss)
        return {"pss_bytes": pss, "private_bytes": uss, "shared_pss_bytes": max(0, pss - uss)}

    def sample(self) -> dict[str, Any]:
        """``rss_bytes``, ``pss_bytes``, ``private_bytes``, ``shared_pss_bytes`` (None where
        the system cannot tell), ``cuda_allocated_bytes``, ``cuda_reserved_bytes`` (None
        off CUDA)."""
        allocated: int | None = None
        reserved: int | None = None
        if self._cuda_probe is not None:
            try:
                allocated, reserved = self._cuda_probe()
            except RuntimeError:
                # A CUDA error surfaces at the next forward with its real cause;
                # the heartbeat only reports what it could measure.
                allocated = reserved = None
        return {
            "rss_bytes": self.rss_bytes(),
            **self.proportional(),
            "cuda_allocated_bytes": allocated,
            "cuda_reserved_bytes": reserved,
        }


def torch_cuda_probe(index: int) -> CudaProbe:
    """A probe for CUDA device ``index`` (in this process's visible numbering)."""
    import torch

    def probe() -> tuple[int, int]:
        return int(torch.cuda.memory_allocated(index)), int(torch.cuda.memory_reserved(index))

    return probe
