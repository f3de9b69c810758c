"""The occupancy board: which local cores are busy, idle or lent, shared by every worker.

A small file beside the gateway's ``ipc://`` socket (its private runtime
directory), mapped by each local worker of every model. It holds one record
per core, four 8-byte words:

    offset 0   owner        pid of the worker pinned to the core (0: none)
    offset 8   idle_since   CLOCK_MONOTONIC ns when the owner went idle; 0 while busy
    offset 16  borrower     pid of the worker running a pass on it now (0: none)
    offset 24  last_pass    how long the owner's last forward pass took, in ns

Each word has one writer at a time: ``owner``, ``idle_since`` and
``last_pass`` are written by the worker pinned to the core, ``borrower`` by
the worker that claims it for one pass (and clears it after). Aligned 8-byte
stores and loads through a ``memoryview`` of the mapping are single
instructions, so a reader sees a whole old or new value, never half of one;
what no lock protects (two workers claiming one idle core in the same
microsecond, an owner that starts a pass just after a borrower looked) costs
at most one pass of overlap on that core, the bound :mod:`worker.lending`
documents. ``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every
process on the host.

Nothing here imports torch: the board only says who is where.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

# Cores a board has room for; a core numbered past it is never lent.
MAX_CORES: Final = 1024
_WORDS: Final = 4
_OWNER, _IDLE_SINCE, _BORROWER, _LAST_PASS = 0, 1, 2, 3
SIZE: Final = MAX_CORES * _WORDS * 8
# The layout's version is in the name: a gateway and workers of another make
# never read each other's words.
FILENAME: Final = "cores-v1.board"


def board_path(connect: str) -> Path | None:
    """Where the board of a gateway reached at ``connect`` lives; None for a remote one.

    Only local workers (``ipc://`` in the gateway's runtime directory) share a
    host with each other for sure, so only they share a board.
    """
    if not connect.startswith("ipc://"):
        return None
    return Path(connect.removeprefix("ipc://")).parent / FILENAME


def now_ns() -> int:
    return time.monotonic_ns()


class Board:
    """One worker's view of the board file at ``path`` (created on first use)."""

    def __init__(
        self, path: Path, pid: int | None = None, clock: Callable[[], int] = now_ns
    ) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._clock = clock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Workers race to create it; growing to SIZE is idempotent and
            # zero-fills, so whoever comes second changes nothing.
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")

    def close(self) -> None:
        self._words.release()
        self._map.close()

    # --- the owner's words ----------------------------------------------------

    def own(self, cores: tuple[int, ...]) -> None:
        """Take ``cores`` as this worker's: idle, with no work on its way yet."""
        for core in _on_board(cores):
            # Idle "since boot" (1 ns): a worker that has not served cannot be
            # between two requests of a load, so its cores may be lent at once.
            self._words[core * _WORDS + _IDLE_SINCE] = 1
            self._words[core * _WORDS + _LAST_PASS] = 0
            self._words[core * _WORDS + _OWNER] = self.pid

    def disown(self, cores: tuple[int, ...]) -> None:
        """Give ``cores`` up (the worker is stopping); nobody may borrow them now."""
        for core in _on_board(cores):
            if self._words[core * _WORDS + _OWNER] == self.pid:
                self._words[core * _WORDS + _OWNER] = 0

    def set_busy(self, cores: tuple[int, ...], busy: bool, pass_ns: int = 0) -> None:
        """Mark ``cores`` busy, or idle from now after a pass of ``pass_ns``."""
        value = 0 if busy else self._clock()
        for core in _on_board(cores):
            if not busy:
                self._words[core * _WORDS + _LAST_PASS] = pass_ns
            self._words[core * _WORDS + _IDLE_SINCE] = value

    # --- borrowing ------------------------------------------------------------

    def words(self, cores: int) -> list[int]:
        """The records of cores ``0 .. cores - 1``, four words each, in one copy:
        ``[owner, idle_since, borrower, last_pass, owner, ...]``."""
        return self._words[: min(cores, MAX_CORES) * _WORDS].tolist()

    def idle_since(self, core: int) -> int:
        """When the core's owner went idle (ns); 0 while it is busy."""
        return self._words[core * _WORDS + _IDLE_SINCE] if core < MAX_CORES else 0

    def claim(self, core: int) -> None:
        self._words[core * _WORDS + _BORROWER] = self.pid

    def release(self, core: int) -> None:
        """Clear the claim on ``core`` if it is still this worker's."""
        if self._words[core * _WORDS + _BORROWER] == self.pid:
            self._words[core * _WORDS + _BORROWER] = 0


def _on_board(cores: tuple[int, ...]) -> list[int]:
    return [core for core in cores if 0 <= core < MAX_CORES]
