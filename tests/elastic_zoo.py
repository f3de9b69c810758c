"""A handler that reports the threads and CPU masks its forward pass ran with,
importable by worker processes, for the elastic-cores tests."""

from __future__ import annotations

import os
import time

import torch


def mask_bits(cores: set[int]) -> int:
    return sum(1 << core for core in cores)


def every_mask() -> int:
    """The CPU masks of every thread of this process, together, as a bit set."""
    every = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            every |= mask_bits(os.sched_getaffinity(int(tid)))
        except OSError:
            continue  # a thread that ended meanwhile
    return every


def cores_of(bits: int) -> set[int]:
    return {core for core in range(bits.bit_length()) if bits >> core & 1}


class ThreadProbe:
    """Computes for about ``busy_ms`` (long enough to be worth a lend), then
    answers each row with ``[threads, main thread's mask, every thread's masks
    together, pid]``: masks as bit sets of core numbers."""

    def __init__(self, busy_ms: float = 20.0) -> None:
        self.busy_s = busy_ms / 1000

    def load(self, device: torch.device) -> None:
        self.weight = torch.randn(128, 128)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        main = mask_bits(os.sched_getaffinity(0))
        every = every_mask()
        give_up = time.monotonic() + self.busy_s
        product = self.weight
        while time.monotonic() < give_up:
            product = torch.tanh(product @ self.weight)
        row = torch.tensor([threads, main, every, os.getpid()], dtype=torch.int64)
        return row.repeat(batch.shape[0], 1)


class PinProbe:
    """Answers each row with ``[GOMP_SPINCOUNT or -1, every thread's masks together]``."""

    def load(self, device: torch.device) -> None:
        self.weight = torch.randn(64, 64)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        spin = int(os.environ.get("GOMP_SPINCOUNT", "-1"))
        every = every_mask()
        row = torch.tensor([spin, every], dtype=torch.int64)
        return row.repeat(batch.shape[0], 1)
