"""Logic tier: bench/streams.py's stream reader and percentiles, against a local socket."""

from __future__ import annotations

import asyncio

import pytest

from bench.servers import ServerFailed
from bench.streams import one_stream, percentile, request_bytes

pytestmark = pytest.mark.fast


def chunked_sse(events: int) -> bytes:
    """A streamed /predict answer as uvicorn writes it: one HTTP chunk per event."""
    payloads = [b'data: {"output":%d}\n\n' % i for i in range(events)]
    payloads.append(b"event: end\ndata: {}\n\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    return head + b"\r\n" + body


async def serve_and_read(answer: bytes, events: int, split: int) -> int:
    """Serve ``answer`` in pieces of ``split`` bytes; what one_stream counted."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for at in range(0, len(answer), split):
            writer.write(answer[at : at + split])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        sample = await one_stream(port, request_bytes(port, events), events)
    assert 0 < sample.first_s <= sample.end_s
    return sample.events


@pytest.mark.parametrize("split", [1, 7, 1 << 16])
def test_the_reader_counts_events_however_the_bytes_are_split(split: int) -> None:
    assert asyncio.run(serve_and_read(chunked_sse(50), 50, split)) == 50


def test_a_stream_cut_short_is_an_error() -> None:
    with pytest.raises(ServerFailed, match="49 events"):
        asyncio.run(serve_and_read(chunked_sse(48), 50, 1 << 16))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
