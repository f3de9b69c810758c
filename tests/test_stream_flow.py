"""Real tier: a slow reader pauses the worker's generator (per-stream credit).

A raw socket with a small receive buffer asks for a stream of 64 KiB outputs,
reads the first event and stops reading while holding the connection open.
The generator must stop making outputs once the credit and the socket buffers
between it and the client are full, then finish once the client reads again.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.pool.streams import CREDIT
from tests.conftest import Server, wait_for

TOTAL = 400  # outputs the generator would make if nothing paused it
CHUNK = 64 * 1024  # characters of padding per output
RCVBUF = 4096  # the client's receive buffer, asked before connecting
ASYNCIO_HIGH_WATER = 64 * 1024  # uvicorn's transport pauses writing past this


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flood") / "made.bin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, marker: Path) -> Iterator[Server]:
    kwargs = orjson.dumps({"marker": str(marker)}).decode()
    args = ["--workers", "1", "--handler", "tests.streams:Flood", "--model-kwargs", kwargs]
    args += ["--timeout-s", "300"]  # the stream is held paused on purpose
    server = Server(args, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        server.wait_ready(1)
        yield server
    finally:
        server.stop()


def made(marker: Path) -> int:
    """Outputs the generator has made so far (one byte each)."""
    return marker.stat().st_size if marker.exists() else 0


def wait_steady(marker: Path, quiet_s: float, timeout_s: float) -> int:
    """The count once it has not moved for ``quiet_s``; fail if it keeps moving."""
    deadline = time.monotonic() + timeout_s
    last, since = made(marker), time.monotonic()
    while time.monotonic() < deadline:
        now = made(marker)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return last
        time.sleep(0.05)
    raise AssertionError(f"the generator never paused: {last} outputs made and counting")


def kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to here (tcp_wmem's maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024  # Linux's default


def open_stream(server: Server, row: list[int]) -> socket.socket:
    """A raw HTTP/1.1 SSE request on a socket with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: sets the window
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    body = orjson.dumps({"input_tensor": [row]})
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, data: bytearray, start: int, needle: bytes) -> None:
    """Receive into ``data`` until ``needle`` appears in it past ``start``."""
    while data.find(needle, start) < 0:
        piece = sock.recv(4096)
        assert piece, f"connection closed early after {len(data)} bytes"
        data += piece


def read_to_end(sock: socket.socket, data: bytearray) -> None:
    while piece := sock.recv(1 << 20):
        data += piece


def dechunk(body: bytearray) -> bytes:
    """The payload of a chunked transfer-encoded body."""
    out, at = bytearray(), 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end], 16)
        if size == 0:
            return bytes(out)
        out += body[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2


def test_a_slow_reader_pauses_the_generator_until_it_reads_again(
    server: Server, marker: Path
) -> None:
    data = bytearray()
    with open_stream(server, [TOTAL, CHUNK]) as sock:
        read_until(sock, data, 0, b"\r\n\r\n")
        head_end = data.index(b"\r\n\r\n") + 4
        assert data.startswith(b"HTTP/1.1 200"), data[:head_end]
        read_until(sock, data, head_end, b"\n\n")  # the first event, then stop reading

        paused_at = wait_steady(marker, quiet_s=1.5, timeout_s=60)
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Credit, one output in the generator's hands, one in uvicorn's write,
        # and as many as the kernel buffers and asyncio's write buffer can hold.
        in_buffers = kernel_send_buffer_max() + rcvbuf + ASYNCIO_HIGH_WATER + len(data)
        bound = CREDIT + 2 + math.ceil(in_buffers / CHUNK)
        assert bound < TOTAL // 4, "the test needs a total far above the bound"
        assert paused_at <= bound, f"{paused_at} outputs made for a reader that took one"
        # The stream is paused, not ended: its worker still holds it, and a second
        # quiet spell (not a starved generator that moves on) stays within the bound.
        assert [w["inflight"] for w in server.health()["workers"]] == [1]
        still = wait_steady(marker, quiet_s=1.5, timeout_s=60)
        assert still <= bound, f"{still} outputs made for a reader that took one"

        sock.settimeout(120)
        read_to_end(sock, data)
    events = dechunk(data[head_end:]).split(b"\n\n")
    assert events[-2:] == [b"event: end\ndata: {}", b""]
    outputs = [orjson.loads(event.removeprefix(b"data: "))["output"] for event in events[:-2]]
    assert [output["i"] for output in outputs] == list(range(TOTAL))
    assert all(len(output["pad"]) == CHUNK for output in outputs)
    wait_for(lambda: made(marker) == TOTAL, 10, "the generator to finish")
