"""Assembles one serving pool: runtime directory, socket, records, dispatcher, supervisor.

``Runtime`` is what the app's lifespan starts and stops; it owns the private
runtime directory that holds the ``ipc://`` endpoint and removes it on exit.
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

from gateway import streams
from gateway.dispatch import Dispatcher
from gateway.placement import plan
from gateway.pool import Pool, WorkerRecord
from gateway.supervisor import Supervisor
from gateway.transport import REMOTE, Curve, ZmqTransport
from shared import protocol
from shared.config import ServeSettings

log = logging.getLogger("torchpool.runtime")


class Runtime:
    def __init__(self, settings: ServeSettings, on_fatal: Callable[[str], None]) -> None:
        self.settings = settings
        placements = plan(settings.workers, settings.device, settings.cores_per_worker)
        self.rundir = Path(tempfile.mkdtemp(prefix="torchpool-"))
        curve = None
        if settings.curve_secret and settings.curve_allow:
            curve = Curve(settings.curve_secret, settings.curve_allow)
        self.transport = ZmqTransport(f"ipc://{self.rundir / 'gateway.sock'}", settings.bind, curve)
        self.pool = Pool(placements)
        self.dispatcher = Dispatcher(
            self.pool,
            self.transport,
            queue_size=settings.queue_size,
            timeout_s=settings.timeout_s,
            on_unreachable=lambda w: self.supervisor.declare_lost(
                w, "became unreachable", "unreachable"
            ),
        )
        self.supervisor = Supervisor(settings, self.pool, self.transport, self.dispatcher, on_fatal)
        self._recycles = settings.max_requests_per_worker > 0

    def begin_drain(self, hurry: bool = False) -> None:
        """A stop signal arrived: readiness flips to 503 now; ``hurry`` shortens the drain."""
        self.supervisor.begin_drain(hurry)

    async def drain(self) -> None:
        """Wait until in-flight work is done, the drain timeout passes, or a hurry."""
        await self.supervisor.drain()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # Signals reach only the main thread's loop; elsewhere (tests) skip.
            self.loop.add_signal_handler(signal.SIGTTIN, self.supervisor.scale_by, 1)
            self.loop.add_signal_handler(signal.SIGTTOU, self.supervisor.scale_by, -1)
        self.transport.start(self._route)
        log.info("workers connect to %s", self.transport.endpoint)
        if self.transport.remote_endpoint:
            log.info("remote workers connect to %s", self.transport.remote_endpoint)
        await self.supervisor.start()

    async def stop(self) -> None:
        try:
            await self.supervisor.stop()
        finally:
            self.transport.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _route(self, link: int, identity: bytes, header: dict[str, Any], frames: list[Any]) -> None:
        """Send each message to whoever handles its kind; drop strangers' messages."""
        uid, channel = protocol.split_identity(identity)
        kind = header["t"]
        worker: WorkerRecord | None = self.pool.by_uid(uid)
        if worker is None and link == REMOTE and kind == protocol.HELLO:
            worker = self.supervisor.admit_remote(uid, header)
        if worker is None or worker.link != link:
            # Unknown, or a remote peer using a local worker's name: ignore it.
            log.debug("message %s from unknown worker %r", kind, uid)
            return
        if channel == protocol.DATA_SUFFIX and kind == protocol.REPLY:
            self.dispatcher.on_reply(worker, header, frames)
            if self._recycles:
                self.supervisor.check_recycle(worker)
        elif channel == protocol.DATA_SUFFIX and kind in protocol.STREAM_TYPES:
            streams.on_message(self.dispatcher, worker, header, frames)
            if kind == protocol.END and self._recycles:
                self.supervisor.check_recycle(worker)
        elif channel == protocol.CONTROL_SUFFIX and kind in protocol.CONTROL_TYPES:
            self.supervisor.on_control(worker, header)
        else:
            log.warning("unexpected %r on channel %r from worker %s", kind, channel, uid)
