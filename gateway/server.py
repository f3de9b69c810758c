"""Runs ``torchpool serve``: uvicorn in this process, the pool in its lifespan.

The listening socket is bound before anything is spawned, so a taken port is a
one-line error rather than a pool with nowhere to serve. uvicorn re-raises a
caught SIGTERM/SIGINT after its graceful shutdown; the handlers installed here
absorb that, so a clean shutdown exits 0.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import types

import uvicorn

from gateway.app import create_app
from gateway.placement import plan
from shared.config import ConfigError, ServeSettings
from shared.errors import ModelLoadError

log = logging.getLogger("torchpool.server")


class _Server(uvicorn.Server):
    """uvicorn's server, told to flip readiness the moment a stop signal lands."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.on_signal: list[signal.Signals] = []

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        runtime = getattr(getattr(getattr(app, "state", None), "runtime", None), "pool", None)
        if runtime is not None:
            runtime.draining = True  # /health/ready says 503 from this instant
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings) -> int:
    """Serve until a signal stops it (returns 0).

    Raises ConfigError for settings that cannot work and ModelLoadError when no
    worker of the pool could ever load the model.
    """
    plan(settings.workers, settings.device, settings.cores_per_worker)  # fail before binding
    sock = bind(settings.host, settings.port)
    fatal: list[str] = []
    server: _Server

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    app = create_app(settings, on_fatal)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        access_log=False,
    )
    server = _Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn re-raises the signal it caught once it is done; let that pass.
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if fatal:
        raise ModelLoadError(fatal[0])
    return 0
