"""Successors: replacing a serving worker without dropping a request.

Two things ask for a slot's worker to be replaced while it serves: recycling
(it passed --max-requests-per-worker or --max-worker-rss-mb) and a reload
(every slot, with a new generation of settings). Both only record what they
want: a slot marked ``recycling``, or a pending :class:`Reload`. The
supervisor's reconcile step then calls :meth:`Succession.reconcile` and
:meth:`Succession.start`, the successor half of gunicorn's ``manage_workers``:

- ``start`` boots a successor on the placement of every slot that wants one
  and has none (a reload's successors are started with its settings);
- ``reconcile`` hands a slot over once its successor is ready (a reload's once
  every one of its successors is, all together, so the model never answers
  from two generations of settings), and retires the old worker: it finishes
  what it holds, then stops;
- ``reconcile`` also drops successors that died before taking over (the
  supervisor's reaping only records the death): a recycle keeps the old
  worker and tries again after RECYCLE_RETRY_S; a reload fails with why, its
  other successors are stopped, and the old workers serve on.

A successor takes no request until it has taken over, so neither path can
lose one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from gateway.pool.workers import Pool, Role, State, WorkerRecord
from shared.config import PoolSettings
from shared.errors import Conflict, ModelLoadError

log = logging.getLogger("torchpool.supervisor")

RECYCLE_RETRY_S = 30.0  # after a replacement failed to boot
MIB = 1024 * 1024


class Acts(Protocol):
    """The supervisor's acts that succession uses."""

    async def spawn(self, worker: WorkerRecord, settings: PoolSettings | None = None) -> None: ...

    def retire(
        self, worker: WorkerRecord, reason: str, drain: bool = True, cause: str = "recycle"
    ) -> None:
        """Take ``worker`` out of service and stop it (after it drains, with ``drain``);
        ``cause`` names the end in /health's last_death (see gateway.pool.deaths)."""
        ...

    def put_in_service(self, worker: WorkerRecord) -> None:
        """``worker`` took over its slot: give it work."""
        ...

    def adopt(self, settings: PoolSettings) -> None:
        """From now on, start workers with ``settings`` (a reload succeeded)."""
        ...


@dataclasses.dataclass
class Reload:
    """A reload asked for: every slot gets a successor started with ``settings``.

    ``outcome`` resolves when they have all taken over, or fails with why not
    (a cancelled outcome means the caller gave up: the reload is dropped).
    """

    settings: PoolSettings
    outcome: asyncio.Future[None]
    successors: dict[int, WorkerRecord] = dataclasses.field(default_factory=dict)


def recycle_reason(worker: WorkerRecord, settings: PoolSettings) -> str | None:
    """Why ``worker`` should be replaced now (a limit it passed), or None."""
    reason = None
    limit = settings.max_requests_per_worker
    if limit and worker.requests_served >= limit:
        reason = f"served {worker.requests_served} requests (limit {limit})"
    ceiling = settings.max_worker_rss_mb * MIB
    if ceiling and worker.rss_bytes is not None and worker.rss_bytes > ceiling:
        reason = f"RSS {worker.rss_bytes / MIB:.0f} MiB is over {settings.max_worker_rss_mb:g} MiB"
    return reason


class Succession:
    """The successors of one pool: what is wanted, and the reconcile step's share."""

    def __init__(self, pool: Pool, acts: Acts, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._acts = acts
        self._clock = clock
        self.reload: Reload | None = None

    @property
    def reloading(self) -> bool:
        return self.reload is not None

    # --- what is wanted -------------------------------------------------------------

    def want_successor(self, worker: WorkerRecord, settings: PoolSettings) -> bool:
        """Mark ``worker``'s slot for recycling if it passed a limit; True if newly marked."""
        if (
            worker.recycling
            or self.reload is not None
            or worker.remote
            or worker.role is not Role.CURRENT
            or worker.state is not State.READY
            or self._clock() < worker.recycle_not_before
        ):
            return False
        reason = recycle_reason(worker, settings)
        if reason is None:
            return False
        log.info("recycling %s: %s", worker.name, reason)
        worker.recycling = True
        worker.recycle_reason = reason
        return True

    def begin_reload(self, settings: PoolSettings) -> Reload:
        if self.reload is not None:
            raise Conflict("a reload of this model is already under way")
        self.reload = Reload(settings, asyncio.get_running_loop().create_future())
        return self.reload

    def fail_reload(self, error: Exception) -> None:
        """End the pending reload with ``error``: its successors stop, the old workers serve on."""
        reload, self.reload = self.reload, None
        if reload is None:
            return
        for successor in reload.successors.values():
            self._abandon(successor, "reload abandoned")
        if not reload.outcome.done():
            reload.outcome.set_exception(error)

    # --- the reconcile step's share ---------------------------------------------------

    def reconcile(self) -> None:
        """Everything that needs no new process: drop, hand over, retire."""
        slots = len(self._pool.workers)
        for record in list(self._pool.handovers):
            if record.role is not Role.SUCCESSOR:
                continue
            if record.state is State.STOPPED:
                self._died(record)
            elif record.slot >= slots:
                self._abandon(record, "scaled down")  # its slot was scaled away
        if self.reload is not None:
            self._settle_reload(self.reload)
            return
        for record in list(self._pool.handovers):
            if record.role is Role.SUCCESSOR and record.ready:
                self._take_over(record, "recycle")

    async def start(self, settings: PoolSettings) -> None:
        """Boot a successor for every slot that wants one and has none yet."""
        reload = self.reload
        if reload is not None:
            for old in list(self._pool.workers):
                if self.reload is not reload or reload.outcome.done():
                    return  # it failed meanwhile; nothing more to start
                if old.slot not in reload.successors:
                    reload.successors[old.slot] = successor = self._successor_for(old)
                    try:
                        await self._acts.spawn(successor, reload.settings)
                    except OSError as exc:  # no interpreter to start: the caller hears why
                        note = f"worker {old.slot} could not be started: {exc}"
                        self.fail_reload(ModelLoadError(note))
                        return
            return
        for old in list(self._pool.workers):
            if old.recycling and old.role is Role.CURRENT and not self._has_successor(old.slot):
                await self._acts.spawn(self._successor_for(old), settings)

    # --- helpers ------------------------------------------------------------------------

    def _settle_reload(self, reload: Reload) -> None:
        if reload.outcome.done():  # cancelled: whoever asked for it gave up
            self.fail_reload(ModelLoadError("the reload was cancelled"))
            return
        for record in list(self._pool.handovers):
            if record.role is Role.SUCCESSOR and record not in reload.successors.values():
                # A recycle's successor would bring the old settings back.
                self._abandon(record, "superseded by a reload")
        for worker in self._pool.workers:
            worker.recycling = False
        successors = reload.successors
        if len(successors) < len(self._pool.workers) or not all(
            s.ready for s in successors.values()
        ):
            return
        self.reload = None
        self._acts.adopt(reload.settings)
        for successor in successors.values():
            self._take_over(successor, "reload")
        reload.outcome.set_result(None)
        log.info("model %s: reloaded %d workers", self._pool.model, len(successors))

    def _died(self, successor: WorkerRecord) -> None:
        """A successor died before it took over (reaping recorded why in last_error)."""
        self._pool.handovers.remove(successor)
        note = successor.last_error or f"worker {successor.slot} died before it was ready"
        reload = self.reload
        if reload is not None and successor in reload.successors.values():
            del reload.successors[successor.slot]
            log.error(
                "model %s: reload failed; the old workers serve on: %s", self._pool.model, note
            )
            self.fail_reload(ModelLoadError(note))
            return
        if successor.slot < len(self._pool.workers):
            current = self._pool.workers[successor.slot]
            current.recycling = False
            current.recycle_not_before = self._clock() + RECYCLE_RETRY_S
            log.error(
                "replacement for %s died before it was ready; keeping the old one: %s",
                current.name, note,
            )  # fmt: skip

    def _has_successor(self, slot: int) -> bool:
        return any(w.role is Role.SUCCESSOR and w.slot == slot for w in self._pool.handovers)

    def _successor_for(self, old: WorkerRecord) -> WorkerRecord:
        """A new record that boots on ``old``'s placement and takes over once ready."""
        successor = WorkerRecord(
            old.placement,
            generation=self._pool.next_generation(),
            role=Role.SUCCESSOR,
            model=self._pool.model,
            restarts=old.restarts,
        )
        self._pool.handovers.append(successor)
        return successor

    def _take_over(self, successor: WorkerRecord, cause: str) -> None:
        """A ready successor takes its slot; the old worker drains and stops (``cause``:
        recycle or reload)."""
        slot = successor.slot
        old = self._pool.workers[slot]
        self._pool.handovers.remove(successor)
        successor.role = Role.CURRENT
        self._pool.workers[slot] = successor
        log.info("%s replaced by pid %s; draining pid %s", old.name, successor.pid, old.pid)
        # A worker answers all it holds before it acts on STOP; it gets no new work.
        reason = "replaced by a reload" if cause == "reload" else f"recycled: {old.recycle_reason}"
        self._acts.retire(old, reason, cause=cause)
        self._acts.put_in_service(successor)

    def _abandon(self, successor: WorkerRecord, reason: str) -> None:
        """Stop a successor that will not take over; it holds no request, so at once."""
        self._acts.retire(successor, reason, drain=False)
