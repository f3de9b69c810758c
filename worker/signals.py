"""SIGTERM/SIGINT: the handlers only record the signal and wake the main loop.

``signal.set_wakeup_fd`` makes the C-level handler write the signal number to
a pipe; its read end sits in the serving loop's ``zmq.Poller`` beside the
sockets, so a signal ends a long poll at once with no polling interval.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Final

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class SignalWake:
    """Records stop signals; :attr:`fd` becomes readable when one arrives."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self.received: list[int] = []

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only)."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def drain(self) -> None:
        """Empty the pipe once its bytes have woken the poller."""
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    @property
    def stop_reason(self) -> str | None:
        """``"signal SIGTERM"`` once a stop signal arrived, else None."""
        if not self.received:
            return None
        return f"signal {signal.Signals(self.received[0]).name}"
