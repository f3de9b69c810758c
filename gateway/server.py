"""Runs ``torchpool serve``: uvicorn in this process, the pool in its lifespan.

The listening socket is bound before anything is spawned, so a taken port is a
one-line error rather than a pool with nowhere to serve. uvicorn re-raises a
caught SIGTERM/SIGINT after its graceful shutdown; the handlers installed here
absorb that, so a clean shutdown exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import types
from collections.abc import Callable

import uvicorn

from gateway.api.app import create_app
from gateway.pool.placement import plan_models
from gateway.pool.runtime import Runtime, demands
from shared.config import ConfigError
from shared.errors import ModelLoadError
from shared.heap import freeze_startup_heap
from shared.modelconfig import Config

log = logging.getLogger("torchpool.server")

# Proxies whose X-Forwarded-* headers are trusted; unset: the headers are ignored.
PROXY_ENV = "FORWARDED_ALLOW_IPS"


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before it stops listening.

    The first SIGTERM/SIGINT flips readiness to 503 and refuses new work while
    the server keeps answering (so load balancers see the 503), lets in-flight
    requests finish within --drain-timeout-s, then shuts down. A second signal
    stops at once.
    """

    def __init__(self, config: uvicorn.Config, runtime_of: Callable[[], Runtime | None]) -> None:
        super().__init__(config)
        self._runtime_of = runtime_of
        self._draining = False
        self._hurried = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # uvicorn says where it listens only for sockets it bound itself; this one
        # was bound before the pool started (see bind()), so say it here.
        if self.started and sockets:
            log.info("listening on %s", listening_url(sockets[0]))

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        # This runs in a signal handler: only flag, and hand work to the loop.
        # The pool's state changes on the loop, never inside the handler, which may
        # have interrupted the dispatcher half-way through a change of its own.
        runtime = self._runtime_of()
        if runtime is None or self._draining or self.should_exit:
            # A second signal: every open request is answered 503 and the server
            # stops without waiting out the drain. A third stops without even that.
            # Neither restarts anything: the first one already stopped the pool.
            if runtime is not None:
                runtime.draining = True
                runtime.loop.call_soon_threadsafe(runtime.begin_drain, True)
            self.force_exit = self._hurried
            self._hurried = True
            self.should_exit = True
            return
        self._draining = True
        runtime.draining = True  # readiness answers 503 from now on
        runtime.loop.call_soon_threadsafe(runtime.begin_drain)
        runtime.loop.call_soon_threadsafe(self._drain_then_exit, runtime)

    def _drain_then_exit(self, runtime: Runtime) -> None:
        task = runtime.loop.create_task(runtime.drain())
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def listening_url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a listening socket, with the port it really got."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    return sock


def serve(config: Config) -> int:
    """Serve until a signal stops it (returns 0).

    Raises ConfigError for settings that cannot work and ModelLoadError when no
    worker of any model could ever load it (of any one model, with --strict).
    """
    plan_models(demands(config.models))  # fail before binding
    settings = config.server
    sock = bind(settings.host, settings.port)
    if settings.grpc_port is not None:
        # A taken gRPC port is the same one-line error, before anything is spawned.
        bind(settings.host, settings.grpc_port).close()
    fatal: list[str] = []
    server: _DrainingServer

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    app = create_app(config, on_fatal)
    drain_s = max((m.drain_timeout_s for m in config.models.values()), default=0.0)
    uvicorn_config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=math.ceil(drain_s),
        access_log=settings.access_log,
        # uvicorn's X-Forwarded-For/-Proto rewriting wraps every request, /predict
        # included, and torchpool reads neither the client address nor the scheme:
        # it runs only when asked for, by uvicorn's own FORWARDED_ALLOW_IPS.
        proxy_headers=PROXY_ENV in os.environ,
    )

    server = _DrainingServer(uvicorn_config, lambda: getattr(app.state, "runtime", None))
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn re-raises the signal it caught once it is done; let that pass.
        signal.signal(sig, lambda *_: None)
    freeze_startup_heap()  # imports and the app: never walked by a collection again
    server.run(sockets=[sock])
    if fatal:
        raise ModelLoadError(fatal[0])
    return 0
