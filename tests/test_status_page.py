"""The live status page, rendered by a real headless Chromium against a real pool.

Chromium runs the page's own JavaScript: ``--dump-dom`` after a virtual-time
budget gives the DOM once the page has polled /health a few times. The test
reads the worker rows out of that DOM, and leaves a screenshot beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import Server, wait_for

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--hide-scrollbars",
]
# Virtual milliseconds the page may run: enough for a few one-second polls.
BUDGET_MS = 3000
RUN_TIMEOUT_S = 60.0
SCREENSHOT_COPY = Path("/tmp/torchpool-status.png")
ROW = [0.1 * i for i in range(16)]


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found (scripts/test installs Debian's as root)"
)


def chromium(url: str, *flags: str) -> str:
    """Run headless Chromium once on ``url`` with a fresh profile; its stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="torchpool-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so a hung browser goes with all its helpers
        )
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out.decode(errors="replace")


class WorkerRows(HTMLParser):
    """The worker rows of a dumped page: each row's data attributes and cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, object]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and "data-worker" in found:
            self.rows.append({"attrs": found, "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            cells = self.rows[-1]["cells"]
            assert isinstance(cells, list)
            cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def worker_rows(dom: str) -> list[dict[str, object]]:
    parser = WorkerRows()
    parser.feed(dom)
    return parser.rows


def test_status_page_is_served(demo_server: Server) -> None:
    for path in ("/", "/status"):
        response = demo_server.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "<table" in response.text
    status = demo_server.get("/status.json").json()
    assert status["model"] == "demo"
    assert status["status"] == "ok"
    assert set(status["traffic"]) >= {"requests_per_s", "latency_p50_s", "latency_p99_s"}


def test_status_page_shows_the_workers_in_a_real_browser(
    demo_server: Server, tmp_path: Path
) -> None:
    for _ in range(20):  # some traffic for the throughput and latency cards
        assert demo_server.predict({"input_tensor": [ROW]}).status_code == 200
    health = demo_server.health()
    expected = {(str(w["id"]), str(w["pid"]), w["state"]) for w in health["workers"]}
    assert len(expected) == 2

    def rendered() -> list[dict[str, object]] | None:
        dom = chromium(demo_server.url + "/", f"--virtual-time-budget={BUDGET_MS}", "--dump-dom")
        rows = worker_rows(dom)
        return rows if len(rows) == len(expected) else None

    rows = wait_for(rendered, 120.0, "worker rows on the status page", interval_s=0.5)
    seen = set()
    for row in rows:
        attrs, cells = row["attrs"], row["cells"]
        assert isinstance(attrs, dict) and isinstance(cells, list)
        seen.add((attrs["data-worker"], attrs["data-pid"], attrs["data-state"]))
        # What a reader sees matches the attributes: id, pid, and the state in words.
        assert cells[:3] == [attrs["data-worker"], attrs["data-pid"], attrs["data-state"]]
        assert cells[3] == "cpu"
        assert cells[5].endswith("iB")  # RSS, e.g. "240 MiB"
    assert seen == expected

    screenshot = tmp_path / "status.png"
    chromium(
        demo_server.url + "/",
        f"--virtual-time-budget={BUDGET_MS}",
        "--window-size=1280,640",
        f"--screenshot={screenshot}",
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with contextlib.suppress(OSError):
        shutil.copyfile(screenshot, SCREENSHOT_COPY)  # for a human to look at
