"""The gateway's end of the wire: ZeroMQ ROUTER sockets on the event loop.

One socket per link: ``local`` (``ipc://`` in the private runtime directory,
for the workers this gateway spawns) and, with ``--bind``, ``remote`` (TCP, for
``torchpool worker`` processes elsewhere, CurveZMQ-authenticated unless it is
loopback or the operator opted out). CURVE is set per socket, which is why the
two links are separate: local workers pay no encryption.

Reads are driven by each socket's file descriptor through ``loop.add_reader``
rather than a future per message. ZeroMQ's descriptor is edge-triggered and
any send may consume the edge, so every send schedules one more drain; the
drain reads until ``EVENTS`` says nothing is left.

``Transport`` is the interface the dispatcher and supervisor use;
``ZmqTransport`` is the real one, and tests give them an in-memory fake
(tests/fakes.py), so that their logic is tested without sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared import protocol

log = logging.getLogger("torchpool.transport")

LOCAL = 0
REMOTE = 1

# (link, identity, header, payload frames) -> None
Handler = Callable[[int, bytes, dict[str, object], list[bytes]], None]


# pyzmq's constants are enum.Flag members, and every operation on one (``|``,
# ``&``, and send_multipart's ``SNDMORE | flags``) builds a Flag through
# enum's Python code: several microseconds per request on the hot path.
# Plain ints cost nothing.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_RCVMORE = int(zmq.RCVMORE)


@dataclass(frozen=True)
class Curve:
    """CURVE server settings: our secret key file, and the folder of admitted public keys."""

    secret_file: str
    allow_dir: str


class _Link:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, curve: Curve | None):
        self.sock = ctx.socket(zmq.ROUTER)
        # Fail a send to a peer that is gone instead of dropping it silently.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A remote worker that reconnects takes its identity back.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if curve is not None:
            public, secret = zmq.auth.load_certificate(curve.secret_file)
            if secret is None:
                raise ValueError(f"{curve.secret_file} holds no secret key")
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
            self.sock.curve_server = True
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.fd = cast(int, self.sock.getsockopt(zmq.FD))


class Transport(Protocol):
    """What the gateway needs of its end of the wire."""

    @property
    def endpoint(self) -> str:
        """Where local workers connect."""
        ...

    @property
    def remote_endpoint(self) -> str | None:
        """Where remote workers connect; None without --bind."""
        ...

    def start(self, handler: Handler) -> None:
        """Deliver every well-formed message to ``handler``, on the running loop, from now on."""
        ...

    def send(self, identity: bytes, frames: Sequence[bytes], link: int = LOCAL) -> None:
        """Send without blocking; raises zmq.ZMQError (EHOSTUNREACH) if the peer is gone."""
        ...

    def close(self) -> None: ...


class ZmqTransport:
    def __init__(self, endpoint: str, remote: str | None = None, curve: Curve | None = None):
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        if curve is not None:
            # The ZAP handler admits exactly the workers whose public keys are in allow_dir.
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=curve.allow_dir)
        self._links = [_Link(self._ctx, endpoint, None)]
        if remote is not None:
            self._links.append(_Link(self._ctx, remote, curve))
        self._handler: Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        # The link _drain is reading now (-1: none). A send to it or to a link
        # read later in that drain needs no drain of its own: EVENTS is read
        # again before the drain moves on.
        self._draining = -1

    @property
    def endpoint(self) -> str:
        """Where local workers connect."""
        return self._links[LOCAL].endpoint

    @property
    def remote_endpoint(self) -> str | None:
        """Where remote workers connect (the port resolved if --bind asked for 0)."""
        return self._links[REMOTE].endpoint if len(self._links) > REMOTE else None

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        for link in self._links:
            self._loop.add_reader(link.fd, self._drain)
        self._schedule_drain()

    def send(self, identity: bytes, frames: Sequence[bytes], link: int = LOCAL) -> None:
        """Send without blocking; raises zmq.ZMQError (EHOSTUNREACH) if the peer is gone."""
        # send_multipart, unrolled with int flags (see _MORE). A failed first
        # frame (the peer is gone) sends nothing; later ones cannot fail then.
        sock = self._links[link].sock
        try:
            sock.send(identity, _MORE)
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                if i < last:
                    sock.send(frame, _MORE)
                else:
                    sock.send(frame, _NOBLOCK, copy=len(frame) < protocol.ZERO_COPY_BYTES)
        finally:
            if link < self._draining or self._draining < 0:
                self._schedule_drain()

    def _schedule_drain(self) -> None:
        if self._loop is not None and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        handler = self._handler
        if handler is None:
            return
        try:
            for index, link in enumerate(self._links):
                self._draining = index
                self._drain_link(index, link.sock, handler)
        finally:
            self._draining = -1

    def _drain_link(self, index: int, sock: zmq.Socket[bytes], handler: Handler) -> None:
        while not sock.closed and cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            frames = _recv_multipart(sock)
            if len(frames) < 2:
                continue
            identity = frames[0]
            try:
                header = protocol.unpack_header(frames[1])
            except ValueError as exc:
                log.warning("dropping a malformed message from %r: %s", identity, exc)
                continue
            try:
                handler(index, identity, header, frames[2:])
            except Exception:
                # One bad message must not stop the reader: log it with its cause.
                log.exception("error handling %s from %r", header.get("t"), identity)

    def close(self) -> None:
        for link in self._links:
            if self._loop is not None and not link.sock.closed:
                self._loop.remove_reader(link.fd)
            link.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


def _recv_multipart(sock: zmq.Socket[bytes]) -> list[bytes]:
    """``sock.recv_multipart(NOBLOCK)`` with int options (see _MORE)."""
    frames = [sock.recv(_NOBLOCK)]
    while sock.getsockopt(_RCVMORE):
        frames.append(sock.recv(_NOBLOCK))
    return frames
