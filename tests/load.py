"""Bounded background load for the real-tier tests: loopback only, stopped by the test.

Each client thread posts one-row /predict requests until the block ends (or a
backstop limit passes) and records every outcome: the status of each answer,
every request that got no HTTP answer at all, and the slowest answer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TypeVar

import httpx

ROW = [0.25] * 16

_Clients = TypeVar("_Clients", bound="ClientThreads")


class ClientThreads:
    """``threads`` threads running :meth:`_run` inside a ``with`` block.

    Leaving the block sets ``_stop`` and joins them; a thread still alive a
    minute later is a client that hung, and fails the test.
    """

    def __init__(self, threads: int) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self: _Clients) -> _Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"

    def _run(self) -> None:
        raise NotImplementedError


class Load(ClientThreads):
    """``threads`` clients posting to ``url`` inside a ``with`` block."""

    def __init__(
        self, url: str, threads: int = 4, limit_s: float = 120.0, path: str = "/predict"
    ) -> None:
        self.url = url
        self.path = path
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        # The first bodies of non-200 answers, to say what went wrong.
        self.refusals: list[str] = []
        self.sent = 0
        self.slowest_s = 0.0
        self._deadline = time.monotonic() + limit_s
        super().__init__(threads)

    @property
    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def _run(self) -> None:
        # The client timeout turns a hang into a recorded error instead of a stuck test.
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                with self._lock:
                    self.sent += 1
                started = time.monotonic()
                try:
                    response = client.post(self.path, json={"input_tensor": [ROW]})
                except httpx.HTTPError as exc:  # no HTTP answer at all: the worst outcome
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code != 200 and len(self.refusals) < 10:
                        self.refusals.append(response.text)
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
