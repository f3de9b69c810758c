"""One served model: its settings, its pool of workers, its dispatcher and supervisor.

Every model of a gateway has its own workers, queue and batching; they share
only the transport (one ROUTER socket, each worker's uid prefixed with its
model's name) and the machine's cores, which placement splits among them.
:class:`gateway.pool.runtime.Runtime` holds the models by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.pool.dispatch import Dispatcher
from gateway.pool.placement import Placement
from gateway.pool.process import Spawner, WorkerProcess
from gateway.pool.supervisor import Supervisor
from gateway.pool.transport import Transport
from gateway.pool.weights import WeightsCache
from gateway.pool.workers import DeathCause, Pool, State, WorkerRecord
from shared.config import PoolSettings
from shared.errors import SHUTTING_DOWN, ModelLoadError
from shared.fingerprint import fingerprint

log = logging.getLogger("torchpool.models")


def not_ready_reason(pool: Pool, min_ready: int) -> str | None:
    """Why a model's pool does not take traffic; None when it does.

    The one readiness rule: at least ``min_ready`` workers ready, and not draining.
    A model's :attr:`ModelRuntime.state`, /health/ready and the /v2 probes all ask it.
    """
    if pool.draining:
        return SHUTTING_DOWN
    return _too_few_ready(pool, min_ready)


def _too_few_ready(pool: Pool, min_ready: int) -> str | None:
    count = len(pool.ready_workers())
    if count < min_ready:
        return f"{count} workers ready, fewer than --min-ready {min_ready}"
    return None


class ModelState(str, enum.Enum):
    LOADING = "loading"  # fewer than min_ready workers ready, none failed for good
    READY = "ready"  # at least min_ready workers ready
    FAILED = "failed"  # no worker could load it; the error says why
    UNLOADING = "unloading"  # removed: finishing what it holds, then its workers stop


@dataclass(frozen=True)
class Seams:
    """How a model's supervisor starts worker processes and tells time.

    The defaults are the real ones; the fast tests give fakes (tests/asgi.py).
    """

    spawner: Spawner = WorkerProcess.spawn
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


REAL_SEAMS = Seams()


class ModelRuntime:
    """A model's pool, dispatcher and supervisor, started and stopped together."""

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        placements: list[Placement],
        transport: Transport,
        on_failed: Callable[[ModelRuntime, str], None],
        taken: Callable[[], Sequence[int]] = tuple,
        seams: Seams = REAL_SEAMS,
        weights: WeightsCache | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.fingerprint = fingerprint(settings)
        self._weights = weights
        settings = self._with_weights_dir(settings)
        self.pool = Pool(placements, name)
        self.dispatcher = Dispatcher(
            self.pool,
            transport,
            queue_size=settings.queue_size,
            timeout_s=settings.timeout_s,
            on_unreachable=lambda w: self.supervisor.declare_lost(
                w, "became unreachable", DeathCause.UNREACHABLE
            ),
        )
        self.supervisor = Supervisor(
            settings,
            self.pool,
            transport,
            self.dispatcher,
            self._failed,
            spawner=seams.spawner,
            clock=seams.clock,
            sleep=seams.sleep,
            taken=taken,
        )
        self.supervisor.on_ready = self._worker_ready
        self.error: str | None = None
        self.unloading = False
        # Remote workers refused for a fingerprint that is not this model's, by uid.
        self.refused: dict[str, dict[str, Any]] = {}
        self._on_failed = on_failed
        self._changed = asyncio.Event()

    @property
    def settings(self) -> PoolSettings:
        return self.supervisor.settings

    @property
    def recycles(self) -> bool:
        return self.settings.max_requests_per_worker > 0

    @property
    def state(self) -> ModelState:
        if self.unloading:
            return ModelState.UNLOADING
        if self.error is not None:
            return ModelState.FAILED
        # A draining pool keeps its state: unloading says so, and at shutdown
        # the health document shows what the model was until it stops.
        if _too_few_ready(self.pool, self.settings.min_ready) is None:
            return ModelState.READY
        return ModelState.LOADING

    def placements(self) -> list[Placement]:
        """Where this model's local workers run (successors share their slot's)."""
        return [w.placement for w in self.pool.all_records() if not w.remote]

    async def start(self) -> None:
        await self.supervisor.start()

    async def stop(self) -> None:
        """Let in-flight requests finish (at most drain_timeout_s), then stop every worker;
        then remove the weights they shared."""
        try:
            await self.supervisor.stop()
        finally:
            if self._weights is not None:
                self._weights.remove_model(self.name)

    async def wait_all_ready(self) -> None:
        """Until every local worker of the model is ready (an admin load's 201).

        ModelLoadError when the model fails, or when a worker gives up for good
        (it failed its boots in a row) while others are ready: the pool asked for
        can then never be reached.
        """
        while True:
            self._changed.clear()
            if self.state is ModelState.FAILED:
                raise ModelLoadError(f"model {self.name!r} could not load: {self.error}")
            workers = self.pool.workers
            failed = [w for w in workers if w.state is State.FAILED]
            if failed:
                raise ModelLoadError(
                    f"model {self.name!r}: worker {failed[0].slot} could not load: "
                    f"{failed[0].last_error}"
                )
            if all(w.ready for w in workers):
                return
            # READY wakes this at once; a worker giving up has no event of its
            # own, so look again at least every quarter second.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.25)

    async def reload(self, settings: PoolSettings | None = None) -> None:
        """Rolling replacement of every worker; ModelLoadError if it fails (old ones serve on)."""
        settings = settings or self.settings
        new_fingerprint = await asyncio.to_thread(fingerprint, settings)
        # The successors publish afresh (the files or the code behind them may
        # have changed); the old generation's folder goes once they took over.
        old, settings = self.settings.weights_dir, self._with_weights_dir(settings)
        try:
            await self.supervisor.reload(settings)
        except BaseException:
            self._remove_weights(settings.weights_dir)
            raise
        self._remove_weights(old)
        self.fingerprint = new_fingerprint
        self.error = None  # a model that had failed serves now

    def _with_weights_dir(self, settings: PoolSettings) -> PoolSettings:
        if self._weights is None:
            return settings
        return dataclasses.replace(settings, weights_dir=str(self._weights.model_dir(self.name)))

    def _remove_weights(self, folder: str | None) -> None:
        if self._weights is not None and folder:
            self._weights.remove(Path(folder))

    def _worker_ready(self, worker: WorkerRecord) -> None:
        self._changed.set()

    def _failed(self, reason: str) -> None:
        """Every worker failed to load the model before any was ready."""
        self.error = reason
        log.error("model %s failed to load: %s", self.name, reason)
        self._changed.set()
        self._on_failed(self, reason)
