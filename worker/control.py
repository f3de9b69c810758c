"""The control thread: it alone owns the control socket.

ZeroMQ sockets are not thread-safe, so the control DEALER lives in this
thread. The main thread talks to it over an inproc PAIR (one end each):

    main -> control   [b"send", <packed header>]   queue a lifecycle message
                      [b"close"]                   flush what is queued and exit
    control -> main   [b"stop", <reason>]          the gateway sent STOP
                      [b"orphan", <reason>]        the parent process went away
                      [b"failed", <reason>]        this thread died; stop serving

Heartbeats run here, apart from inference: torch releases the GIL inside
kernels, so a long forward pass never stalls them and a busy worker is never
taken for a hung one. Each heartbeat measures memory afresh and says how long
the current batch has run (``batch_s``), so the gateway can still tell a
forward pass that never returns, which keeps heartbeats flowing, from a long one.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import zmq

from shared import protocol
from worker.serve.pacing import WaitHistogram
from worker.stats import MemorySampler

# A worker whose parent died has nobody to answer; if the main thread cannot
# wind down in this long (e.g. it is still loading a model), exit anyway.
ORPHAN_GRACE_S: Final = 5.0
# How long queued messages (an ERROR, a BYE) may take to reach the gateway on close.
LINGER_MS: Final = 1000
# Exit status of a worker that ended because its parent died mid-work.
EXIT_ORPHANED: Final = 1


class WorkerState:
    """Counters the serving loop writes and the control thread reads.

    Plain attribute reads and writes are atomic under the GIL, which is all
    a heartbeat needs.
    """

    def __init__(self, batch_limit_s: float | None = None) -> None:
        # time.monotonic() when the batch now running started; None while idle.
        self._busy_since: float | None = None
        # Armed for each batch: past it, faulthandler's C thread (no GIL needed,
        # so a pass stuck in C code cannot stop it) dumps every stack and exits.
        self._batch_limit_s = batch_limit_s or None
        # Forward passes run, by rows in the batch; only the serving loop writes it.
        self.batches: dict[int, int] = {}
        # Seconds each request waited in the worker before its forward pass.
        self.waits = WaitHistogram()
        # Intra-op threads of the last forward pass (more than its own cores
        # when it borrowed idle ones), and passes run by thread count.
        self.threads = 0
        self.thread_passes: dict[int, int] = {}

    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy_since = time.monotonic() if value else None
        if self._batch_limit_s is not None:
            if value:
                faulthandler.dump_traceback_later(self._batch_limit_s, exit=True)
            else:
                faulthandler.cancel_dump_traceback_later()

    def batch_s(self) -> float | None:
        """How long the batch now running has run (HEARTBEAT ``batch_s``); None while idle."""
        since = self._busy_since  # one read: the serving loop may clear it meanwhile
        return None if since is None else round(time.monotonic() - since, 3)

    def count_batch(self, rows: int) -> None:
        self.batches[rows] = self.batches.get(rows, 0) + 1

    def count_threads(self, threads: int) -> None:
        self.threads = threads
        self.thread_passes[threads] = self.thread_passes.get(threads, 0) + 1

    def batches_report(self) -> list[list[int]]:
        """``[[rows, count], ...]`` for a heartbeat (msgpack map keys must be strings)."""
        # dict.copy() runs without releasing the GIL, so it cannot see the
        # serving loop's dict mid-update, as iterating the dict itself could.
        return [[rows, count] for rows, count in self.batches.copy().items()]


class ControlThread(threading.Thread):
    """Owns the control socket; see the module docstring for its inproc protocol."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        uid: str,
        heartbeat_s: float,
        state: WorkerState,
        sampler: MemorySampler,
        parent_pid: int | None,
        secure: Callable[[zmq.Socket[bytes]], None] = lambda sock: None,
    ) -> None:
        super().__init__(name="torchpool-control", daemon=True)
        self._secure = secure
        # A remote worker re-sends these when the gateway falls silent, so a
        # gateway that restarted (or gave up on us) learns of it again.
        self._announcements: dict[str, bytes] = {}
        self._announce_after_s = max(3 * heartbeat_s, 3.0)
        self._ctx = ctx
        self._endpoint = endpoint
        self._uid = uid
        self._heartbeat_s = heartbeat_s
        self._state = state
        self._sampler = sampler
        self._parent_pid = parent_pid
        self._pair_addr = f"inproc://torchpool-control-{id(self)}"
        # The main thread's end; bound here so the thread's connect always finds it.
        self.main_end: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self.main_end.bind(self._pair_addr)
        self.last_beat: float | None = None

    # --- main-thread side -------------------------------------------------

    def send(self, header: dict[str, Any]) -> None:
        """Queue one lifecycle message for the gateway (main thread only)."""
        self.main_end.send_multipart([b"send", protocol.pack({**header, "uid": self._uid})])

    def read_event(self) -> tuple[str, str] | None:
        """The next event for the main loop, or None when none is waiting."""
        try:
            kind, reason = self.main_end.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return kind.decode(), reason.decode(errors="replace")

    def close(self, timeout_s: float = LINGER_MS / 1000 + 0.5) -> None:
        """Flush queued messages, stop the thread (bounded), close the main end."""
        if self.is_alive():
            self.main_end.send_multipart([b"close"])
            self.join(timeout_s)
        self.main_end.close(linger=0)

    # --- the thread -------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except Exception as exc:
            # The worker must not keep computing without heartbeats: tell the
            # main loop, which stops and exits.
            print(f"torchpool worker: control thread failed: {exc!r}", file=sys.stderr)
            try:
                pair = self._ctx.socket(zmq.PAIR)
                pair.connect(self._pair_addr)
                pair.send_multipart([b"failed", repr(exc).encode()])
                pair.close(linger=LINGER_MS)
            except zmq.ZMQError:
                pass

    def _serve(self) -> None:
        control: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, protocol.control_identity(self._uid))
        control.setsockopt(zmq.LINGER, LINGER_MS)
        self._secure(control)
        control.connect(self._endpoint)
        pair: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
        pair.connect(self._pair_addr)
        poller = zmq.Poller()
        poller.register(pair, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        next_beat = time.monotonic() + self._heartbeat_s
        self._born = self._announced = time.monotonic()
        orphaned_at: float | None = None
        try:
            while True:
                # Ticks at least once a second so a dead parent is noticed soon.
                wait_s = min(max(0.0, next_beat - time.monotonic()), 1.0)
                events = dict(poller.poll(round(wait_s * 1000)))
                if pair in events and self._forward_outgoing(pair, control):
                    return
                if control in events:
                    self._handle_incoming(control, pair)
                now = time.monotonic()
                if now >= next_beat:
                    control.send(protocol.pack(self._heartbeat()))
                    next_beat = now + self._heartbeat_s
                if self._parent_pid is None:
                    self._announce_if_unheard(control, now)
                if orphaned_at is None and self._parent_gone():
                    orphaned_at = now
                    pair.send_multipart([b"orphan", b"the parent process exited"])
                if orphaned_at is not None and now - orphaned_at > ORPHAN_GRACE_S:
                    os._exit(EXIT_ORPHANED)
        finally:
            control.close()
            pair.close(linger=0)

    def _forward_outgoing(self, pair: zmq.Socket[bytes], control: zmq.Socket[bytes]) -> bool:
        """Send every queued message; True once the main thread asked to close."""
        while True:
            try:
                frames = pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if frames[0] == b"close":
                return True
            kind = protocol.unpack_header(frames[1])["t"]
            if kind in (protocol.HELLO, protocol.READY):
                self._announcements[kind] = frames[1]
            control.send(frames[1])

    def _announce_if_unheard(self, control: zmq.Socket[bytes], now: float) -> None:
        """Say hello (and ready) again when the gateway has not beaten for a while."""
        heard = self.last_beat if self.last_beat is not None else self._born
        if now - max(heard, self._announced) < self._announce_after_s:
            return
        self._announced = now
        for kind in (protocol.HELLO, protocol.READY):
            if kind in self._announcements:
                control.send(self._announcements[kind])

    def _handle_incoming(self, control: zmq.Socket[bytes], pair: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                header = protocol.unpack_header(frames[0])
            except ValueError:
                # Only the gateway can reach this socket; a frame it cannot
                # have meant is dropped rather than allowed to stop the worker.
                continue
            if header["t"] == protocol.BEAT:
                self.last_beat = time.monotonic()
            elif header["t"] == protocol.STOP:
                reason = str(header.get("reason") or "stop requested by the gateway")
                pair.send_multipart([b"stop", reason.encode()])

    def _heartbeat(self) -> dict[str, Any]:
        return {
            "t": protocol.HEARTBEAT,
            "uid": self._uid,
            "batch_s": self._state.batch_s(),
            "batches": self._state.batches_report(),
            "waits": self._state.waits.report(),
            "threads": self._state.threads,
            "thread_passes": [[n, c] for n, c in self._state.thread_passes.copy().items()],
            **self._sampler.sample(),
        }

    def _parent_gone(self) -> bool:
        return self._parent_pid is not None and os.getppid() != self._parent_pid
