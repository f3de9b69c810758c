"""The gateway's end of the wire: one ZeroMQ ROUTER socket on the event loop.

Reads are driven by the socket's file descriptor through ``loop.add_reader``
rather than a future per message. ZeroMQ's descriptor is edge-triggered and
any send may consume the edge, so every send schedules one more drain; the
drain reads until ``EVENTS`` says nothing is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import cast

import zmq

from shared import protocol

log = logging.getLogger("torchpool.transport")

# (identity, header, payload frames) -> None
Handler = Callable[[bytes, dict[str, object], list[zmq.Frame]], None]


class Transport:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # Fail a send to a peer that is gone instead of dropping it silently.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker process reuses no identity, but a reconnecting one may.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(endpoint)
        self._fd = cast(int, self._sock.getsockopt(zmq.FD))
        self._handler: Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()

    def send(self, identity: bytes, frames: Sequence[bytes | memoryview | zmq.Frame]) -> None:
        """Send without blocking; raises zmq.ZMQError (EHOSTUNREACH) if the peer is gone."""
        try:
            self._sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        finally:
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if self._loop is not None and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        handler = self._handler
        if handler is None or self._sock.closed:
            return
        while cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            if len(frames) < 2:
                continue
            identity = frames[0].bytes
            try:
                header = protocol.unpack_header(frames[1].buffer)
            except ValueError as exc:
                log.warning("dropping a malformed message from %r: %s", identity, exc)
                continue
            try:
                handler(identity, header, frames[2:])
            except Exception:
                # One bad message must not stop the reader: log it with its cause.
                log.exception("error handling %s from %r", header.get("t"), identity)

    def close(self) -> None:
        if self._loop is not None and not self._sock.closed:
            self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)
        self._ctx.term()
