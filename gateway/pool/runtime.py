"""Assembles the gateway's models on one transport: runtime directory, socket, routing.

``Runtime`` is what the app's lifespan starts and stops; it owns the private
runtime directory that holds the ``ipc://`` endpoint and removes it on exit.
It holds one :class:`gateway.pool.model.ModelRuntime` per served model, routes
each worker message to the model whose worker sent it, and adds and removes
models at run time (the admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.pool import streams
from gateway.pool.model import REAL_SEAMS, ModelRuntime, ModelState, Seams
from gateway.pool.placement import Demand, plan_models
from gateway.pool.transport import REMOTE, Curve, Transport, ZmqTransport
from gateway.pool.weights import WeightsCache
from gateway.pool.workers import WorkerRecord
from shared import protocol
from shared.config import PoolSettings
from shared.errors import Conflict, ModelNotFound
from shared.modelconfig import Config

log = logging.getLogger("torchpool.runtime")


def demands(models: dict[str, PoolSettings]) -> list[Demand]:
    return [Demand(n, s.workers, s.device, s.cores_per_worker) for n, s in models.items()]


class Runtime:
    def __init__(
        self,
        config: Config,
        on_fatal: Callable[[str], None],
        transport: Transport | None = None,
        seams: Seams = REAL_SEAMS,
    ) -> None:
        """``transport`` (default: ZeroMQ sockets in a private runtime directory) and
        ``seams`` are where the fast tests put their fakes (tests/asgi.py)."""
        self.config = config
        self.server = config.server
        self._on_fatal = on_fatal
        placements = plan_models(demands(config.models))
        self.rundir = Path(tempfile.mkdtemp(prefix="torchpool-"))
        # The weights the CPU workers share live as long as this gateway (or its model).
        self.weights = WeightsCache(self.server.weights_cache)
        curve = None
        if self.server.curve_secret and self.server.curve_allow:
            curve = Curve(self.server.curve_secret, self.server.curve_allow)
        self.transport: Transport = transport or ZmqTransport(
            f"ipc://{self.rundir / 'gateway.sock'}", self.server.bind, curve
        )
        self._seams = seams
        # Served models by name; ``_routed`` also holds those still unloading,
        # whose workers answer what they hold before they stop.
        self.models: dict[str, ModelRuntime] = {}
        self._routed: dict[str, ModelRuntime] = {}
        # Observer (metrics): called with each model loaded at run time.
        self.on_model_added: Callable[[ModelRuntime], None] | None = None
        # Only these can stop the server by failing (a model loaded later cannot).
        self._initial = frozenset(config.models)
        for name, settings in config.models.items():
            self._add(name, settings, placements[name])
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- models -------------------------------------------------------------------

    def model(self, name: str | None = None) -> ModelRuntime:
        """The model served as ``name``; None: the only one, or --default-model. 404 if none."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            default = self.server.default_model
            if default is not None and default in self.models:
                return self.models[default]
            raise ModelNotFound(
                "several models are served and none is the default: name one, as in "
                f"/predict/{{name}} ({self.served_names()})",
                models=list(self.models),
            )
        found = self.models.get(name)
        if found is None:
            raise ModelNotFound(
                f"unknown model {name!r}; served: {self.served_names()}", models=list(self.models)
            )
        return found

    def served_names(self) -> str:
        return ", ".join(self.models) or "none"

    def taken_cores(self, besides: ModelRuntime | None = None) -> list[int]:
        """Cores pinned to the local workers of every model but ``besides``."""
        return [
            core
            for model in self._routed.values()
            if model is not besides
            for placement in model.placements()
            for core in placement.cores
        ]

    def _add(self, name: str, settings: PoolSettings, placements: Any) -> ModelRuntime:
        model: ModelRuntime = ModelRuntime(
            name,
            settings,
            placements,
            self.transport,
            self._model_failed,
            taken=lambda: self.taken_cores(besides=model),
            seams=self._seams,
            weights=self.weights,
        )
        self.models[name] = model
        self._routed[name] = model
        return model

    async def load(self, name: str, settings: PoolSettings, wait: bool = True) -> ModelRuntime:
        """Start serving a new model; with ``wait``, until every worker is ready.

        ModelLoadError (and the model unloaded) when that cannot happen.
        """
        if name in self._routed:
            state = "being unloaded" if name not in self.models else "served"
            raise Conflict(f"model {name!r} is {state} already", models=list(self.models))
        placements = plan_models(
            [Demand(name, settings.workers, settings.device, settings.cores_per_worker)],
            taken=self.taken_cores(),
        )[name]
        model = self._add(name, settings, placements)
        if self.on_model_added is not None:
            self.on_model_added(model)
        log.info("loading model %s: %d workers", name, settings.workers)
        await model.start()
        if wait and settings.workers:
            try:
                await model.wait_all_ready()
            except Exception:
                await self.unload(name)
                raise
        return model

    async def unload(self, name: str) -> None:
        """Stop routing to ``name`` now (404), let what it holds finish, stop its workers."""
        model = self.model(name)
        del self.models[name]
        model.unloading = True
        log.info("unloading model %s", name)
        try:
            await model.stop()
        finally:
            self._routed.pop(name, None)

    async def reload_all(self) -> None:
        """SIGHUP: reload every model, one after another; a failure leaves that one as it was."""
        for model in list(self.models.values()):
            try:
                await model.reload()
            except Exception as exc:
                log.error("reloading model %s failed; it serves on as before: %s", model.name, exc)

    def _model_failed(self, model: ModelRuntime, reason: str) -> None:
        """A model's workers all failed to load before any was ready."""
        if model.name not in self.models or model.name not in self._initial:
            return
        states = [m.state for m in self.models.values()]
        if self.server.strict or all(state is ModelState.FAILED for state in states):
            self._on_fatal(reason if len(self.models) == 1 else f"model {model.name}: {reason}")

    # --- lifecycle ------------------------------------------------------------------

    def begin_drain(self, hurry: bool = False) -> None:
        """A stop signal arrived: readiness flips to 503 now; ``hurry`` shortens the drain."""
        self.draining = True
        for model in self._routed.values():
            model.supervisor.begin_drain(hurry)

    async def drain(self) -> None:
        """Wait until in-flight work is done, the drain timeout passes, or a hurry."""
        await asyncio.gather(*(m.supervisor.drain() for m in self._routed.values()))

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # Signals reach only the main thread's loop; elsewhere (tests) skip.
            self.loop.add_signal_handler(signal.SIGTTIN, self._scale_by, 1)
            self.loop.add_signal_handler(signal.SIGTTOU, self._scale_by, -1)
            self.loop.add_signal_handler(signal.SIGHUP, self._background, self.reload_all)
        self.transport.start(self._route)
        log.info("workers connect to %s", self.transport.endpoint)
        if self.transport.remote_endpoint:
            log.info("remote workers connect to %s", self.transport.remote_endpoint)
        for model in list(self.models.values()):
            await model.start()

    async def stop(self) -> None:
        try:
            await asyncio.gather(*(m.stop() for m in self._routed.values()))
            for task in list(self._tasks):
                task.cancel()
        finally:
            self.transport.close()
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.weights.close()

    def _scale_by(self, delta: int) -> None:
        """SIGTTIN/SIGTTOU resize the one (or the default) model."""
        with contextlib.suppress(ModelNotFound):
            self.model().supervisor.scale_by(delta)

    def _background(self, make: Callable[[], Any]) -> None:
        task = asyncio.get_running_loop().create_task(make())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- messages ---------------------------------------------------------------------

    def _route(self, link: int, identity: bytes, header: dict[str, Any], frames: list[Any]) -> None:
        """Send each message to whoever handles its kind; drop strangers' messages."""
        uid, channel = protocol.split_identity(identity)
        kind = header["t"]
        model = self._routed.get(uid.partition("/")[0])
        worker: WorkerRecord | None = model.pool.by_uid(uid) if model is not None else None
        if worker is None:
            for candidate in self._routed.values():
                worker = candidate.pool.by_uid(uid)
                if worker is not None:
                    model = candidate
                    break
        if worker is None and link == REMOTE and kind == protocol.HELLO:
            model = self._remote_model(uid, header)
            worker = model.supervisor.admit_remote(uid, header) if model is not None else None
        if worker is None or model is None or worker.link != link:
            # Unknown, or a remote peer using a local worker's name: ignore it.
            log.debug("message %s from unknown worker %r", kind, uid)
            return
        if channel == protocol.DATA_SUFFIX and kind == protocol.REPLY:
            model.dispatcher.on_reply(worker, header, frames)
            if model.recycles:
                model.supervisor.check_recycle(worker)
        elif channel == protocol.DATA_SUFFIX and kind in protocol.STREAM_TYPES:
            streams.on_message(model.dispatcher, worker, header, frames)
            if kind == protocol.END and model.recycles:
                model.supervisor.check_recycle(worker)
        elif channel == protocol.CONTROL_SUFFIX and kind in protocol.CONTROL_TYPES:
            model.supervisor.on_control(worker, header)
        else:
            log.warning("unexpected %r on channel %r from worker %s", kind, channel, uid)

    def _remote_model(self, uid: str, hello: dict[str, Any]) -> ModelRuntime | None:
        """The model a remote worker's HELLO names (the only or default one if it names
        none), if its settings' fingerprint matches that model's; else None, and why is
        logged and shown in /health."""
        name = hello.get("model")
        try:
            model = self.model(name if isinstance(name, str) else None)
        except ModelNotFound as exc:
            log.warning("refusing remote worker %r: %s", uid, exc.message)
            return None
        theirs = hello.get("fingerprint")
        reason = None
        if theirs is None:
            # Nothing to check it against, so it is not trusted to give this model's answers.
            why = hello.get("fingerprint_error")
            reason = (
                f"it sent no settings fingerprint, so the gateway cannot check that it "
                f"serves model {model.name}: " + (str(why) if why else "an older torchpool worker?")
            )
        elif theirs != model.fingerprint:
            reason = (
                f"its settings fingerprint {theirs} is not model {model.name}'s "
                f"{model.fingerprint}: another model file, or flags that change answers"
            )
        if reason is not None:
            if uid not in model.refused:
                log.warning("refusing remote worker %r from %s: %s", uid, hello.get("host"), reason)
            model.refused[uid] = {"uid": uid, "host": hello.get("host"), "reason": reason}
            return None
        model.refused.pop(uid, None)
        return model
