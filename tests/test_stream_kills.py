"""Real tier: every stream ends with ``end`` or ``error``, repeated under kills.

Stream clients keep posting while the one streaming worker is SIGKILLed again
and again, at random points of its streams (between chunks, before the first,
as one ends). Every answer must be either a 200 event stream whose last event
is ``end`` or ``error``, or a JSON error with its status; never a stream that
just stops.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from collections.abc import Callable

import httpx

from tests.conftest import Server, wait_for
from tests.load import ClientThreads

FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")
SSE = {"Accept": "text/event-stream"}
KILLS = 6


class StreamClients(ClientThreads):
    """Threads streaming until told to stop; each outcome is classified."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.bad: list[str] = []
        super().__init__(threads)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def _run(self) -> None:
        rng = random.Random()
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                count = rng.randint(0, 8)
                body = {"input_tensor": [[count, 0.02, -1]]}
                outcome = self._one(client, body, count)
                with self._lock:
                    self.outcomes[outcome.split(":")[0]] += 1
                    if outcome.startswith("bad"):
                        self.bad.append(outcome)

    @staticmethod
    def _one(client: httpx.Client, body: object, count: int) -> str:
        try:
            with client.stream("POST", "/predict", json=body, headers=SSE) as response:
                if response.status_code != 200:
                    response.read()
                    return f"status {response.status_code}"
                if response.headers.get("content-type") != "text/event-stream":
                    return f"bad: 200 as {response.headers.get('content-type')}"
                names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
                data = response.num_bytes_downloaded
        except httpx.HTTPError as exc:
            return f"bad: no answer {exc!r}"
        if not names or names[-1] not in ("end", "error"):
            return f"bad: stream ended with {names[-1:] or 'no event'} ({data} bytes)"
        return names[-1]


def test_every_stream_ends_with_end_or_error_under_repeated_kills(
    serve: Callable[..., Server],
) -> None:
    server = serve("--handler", "tests.streams:Counter", "--workers", "1", *FAST_BEATS)
    rng = random.Random(19)
    with StreamClients(server.url) as clients:
        for _ in range(KILLS):
            wait_for(lambda: server.health()["ready_workers"] == 1, 90, "a ready worker")
            done = clients.total
            wait_for(lambda: clients.total > done + 3, 30, "streams to flow")  # noqa: B023
            # Half the kills while a stream is under way (between chunks), half
            # whenever the health answer comes (before a stream, or as one ends).
            if rng.random() < 0.5:
                wait_for(lambda: server.health()["workers"][0]["inflight"], 30, "a stream")
            os.kill(int(server.health()["workers"][0]["pid"]), signal.SIGKILL)
        server.wait_ready(1, timeout_s=90)
        done = clients.total
        wait_for(lambda: clients.total > done + 3, 30, "streams to flow again")
    print(f"\nstreams under {KILLS} kills: {dict(clients.outcomes)}")
    assert clients.bad == [], clients.bad
    assert clients.outcomes["end"] > 0 and server.health()["workers"][0]["restarts"] == KILLS
