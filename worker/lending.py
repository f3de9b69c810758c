"""Elastic cores: a forward pass borrows the cores of idle workers, for that pass only.

Each local CPU worker is pinned to its own cores. When it starts a pass,
:meth:`Lending.start` marks its cores busy on the :mod:`worker.board` and
looks at every other core on the host (every model's workers share the
board). A core is borrowed when

- a worker owns it (cores the gateway kept for itself are never lent),
- its owner has been idle for at least :data:`HOLD_OFF_NS` and for at
  least as long as its own last pass took: under steady load a worker is
  idle only for the round trip between an answer and the next request (a
  millisecond or two here, well under a pass worth lending for), and a pass
  that borrowed its core then would run into the request about to come. A
  worker idle longer than both has no work on its way, as far as anyone
  can tell,
- nobody else is borrowing it (a borrower that died leaves a claim no live
  process holds; that claim counts as free),
- and the pass is worth it: the worker's recent passes took at least
  :data:`MIN_FORWARD_S` (widening thread masks costs tens of microseconds,
  which a 50 us model would feel and a 20 ms one does not), and more
  threads make this model faster per row at this batch size, as the
  worker's own passes have measured (:meth:`worker.serve.sizing.BatchSizer.lend_pays`:
  a model that a second thread does not speed up stops borrowing).

The pass then runs with one intra-op thread per core (its own plus the
borrowed) and every thread of the process may run on all of them.
:meth:`Lending.end` narrows the threads back to the worker's own cores and
thread count, clears its claims and marks its cores idle: a lend never
outlives the pass that took it.

The cost, bounded: an owner that receives work while its cores are lent
runs at once on its own cores, with its own threads, beside the borrower's
extra thread until the borrower's pass ends. For that moment the host runs
at most one thread more per lent core than it has cores; never more, since
only cores a worker owns are lent, each to one borrower at a time (two
borrowers that claim the same core in the same microsecond share it for one
pass: the board has no lock, see :mod:`worker.board`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from worker.board import MAX_CORES, now_ns

# An owner idle for less than this may be between two requests of a steady load.
HOLD_OFF_NS: Final = 3_000_000
# Passes shorter than this run on the worker's own cores: a lend costs tens of us.
MIN_FORWARD_S: Final = 0.001


class BoardView(Protocol):
    """What lending reads and writes on the board (:class:`worker.board.Board`, or a fake)."""

    pid: int

    def words(self, cores: int) -> list[int]: ...
    def idle_since(self, core: int) -> int: ...
    def claim(self, core: int) -> None: ...
    def release(self, core: int) -> None: ...
    def set_busy(self, cores: tuple[int, ...], busy: bool, pass_ns: int = 0) -> None: ...


class Threads(Protocol):
    """Sets the pass's intra-op threads and the CPU mask of every thread of the process."""

    def apply(self, threads: int, cores: tuple[int, ...]) -> None: ...


def worth_lending(forward_s: float | None) -> bool:
    """Whether passes of ``forward_s`` (None: not measured yet) may borrow cores."""
    return forward_s is None or forward_s >= MIN_FORWARD_S


def _always(threads: int) -> bool:
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lending:
    """One worker's side of elastic cores (see the module docstring)."""

    def __init__(
        self,
        board: BoardView,
        own: tuple[int, ...],
        host: Iterable[int],
        threads: Threads,
        *,
        alive: Callable[[int], bool] = pid_alive,
        clock: Callable[[], int] = now_ns,
    ) -> None:
        self._board = board
        self.own = own
        # The cores this worker could ever borrow: the host's, less its own
        # (and any numbered past what the board has room for).
        self._others = tuple(
            core for core in sorted(set(host)) if core not in set(own) and 0 <= core < MAX_CORES
        )
        self._threads = threads
        self._alive = alive
        self._clock = clock
        self.borrowed: tuple[int, ...] = ()
        self._started = 0  # clock() when the pass now running started

    def available(self) -> list[int]:
        """Cores a pass starting now could borrow (claims nothing).

        One copy of the board's words, then plain list reads: a few
        microseconds for a few cores, tens for a hundred.
        """
        if not self._others:
            return []
        board = self._board
        now, me = self._clock(), board.pid
        words = board.words(self._others[-1] + 1)
        found = []
        for core in self._others:
            owner, since, borrower, last_pass = words[4 * core : 4 * core + 4]
            if owner == 0 or owner == me or since == 0:
                continue
            if now - since < max(HOLD_OFF_NS, last_pass):
                continue
            if borrower == 0 or (borrower != me and not self._alive(borrower)):
                found.append(core)
        return found

    def start(self, forward_s: float | None, pays: Callable[[int], bool] = _always) -> int:
        """Mark this worker busy and borrow what is idle; the pass's thread count.

        ``forward_s`` is the worker's recent pass duration (None: not known yet);
        ``pays(threads)`` says whether this pass would run faster per row on
        ``threads`` threads than on the worker's own (the batch sizer's measure).
        """
        self._started = self._clock()
        self._board.set_busy(self.own, True)
        if not worth_lending(forward_s):
            return len(self.own)
        idle = self.available()
        if not idle or not pays(len(self.own) + len(idle)):
            return len(self.own)
        claimed: list[int] = []
        for core in idle:
            self._board.claim(core)
            # The owner may have started a pass between the look and the claim.
            if self._board.idle_since(core) == 0:
                self._board.release(core)
            else:
                claimed.append(core)
        if not claimed:
            return len(self.own)
        threads = len(self.own) + len(claimed)
        try:
            self._threads.apply(threads, self.own + tuple(claimed))
        except OSError:
            # A core that cannot be used after all (taken offline, outside a
            # new cpuset): this pass runs on the worker's own cores.
            self._threads.apply(len(self.own), self.own)
            for core in claimed:
                self._board.release(core)
            return len(self.own)
        self.borrowed = tuple(claimed)
        return threads

    def end(self) -> None:
        """Give back what the pass borrowed and mark this worker idle."""
        if self.borrowed:
            self._threads.apply(len(self.own), self.own)
            for core in self.borrowed:
                self._board.release(core)
            self.borrowed = ()
        self._board.set_busy(self.own, False, self._clock() - self._started)


class TorchThreads:
    """:class:`Threads` for a real worker: ``torch.set_num_threads`` and per-thread masks.

    OpenMP's threads are created by the main thread and inherit its mask when
    they are; those that already exist keep theirs, so every thread of the
    process gets the new mask. Widening sets the masks before the thread
    count, so threads the pass creates inherit the wide mask; narrowing sets
    the count first. The thread ids are listed from /proc/self/task once and
    again only when a pass may have started new threads (more than any pass
    before) or one of them has ended: a listing costs more than the masks.
    """

    def __init__(self) -> None:
        self._tids: list[int] | None = None
        # The most threads a pass has run with, and that count when last listed.
        self._widest = 0
        self._listed_at = 0
        # The mask every thread has now (the worker's own cores between passes).
        self._cores: frozenset[int] = frozenset(os.sched_getaffinity(0))
        self._main = threading.get_native_id()

    def apply(self, threads: int, cores: tuple[int, ...]) -> None:
        import torch

        if threads > torch.get_num_threads():
            # Threads other than the main one start on the borrowed cores: an
            # OpenMP thread still spinning on the worker's own core would
            # otherwise stay there, beside the main thread, until the
            # scheduler moves it (a 384x384 product ran 5-12x slower so).
            borrowed = tuple(sorted(set(cores) - self._cores))
            if borrowed:
                self._set_masks(borrowed, skip_main=True)
            self._set_masks(cores)
            torch.set_num_threads(threads)
            self._widest = max(self._widest, threads)
            return
        torch.set_num_threads(threads)
        if self._widest > self._listed_at:
            self._tids = None  # the pass that just ended may have started threads
        self._set_masks(cores)

    def _set_masks(self, cores: tuple[int, ...], skip_main: bool = False) -> None:
        """Every thread of this process (but the main one, with ``skip_main``) may run
        on ``cores``, and only there."""
        if self._tids is None:
            self._tids = [int(tid) for tid in os.listdir("/proc/self/task")]
            self._listed_at = self._widest
        for tid in self._tids:
            if skip_main and tid == self._main:
                continue
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:
                self._tids = None  # a thread ended: list them afresh next time
            except PermissionError:
                continue
        if not skip_main:
            self._cores = frozenset(cores)
