"""Streams: time to first event and events per second, served against in-process.

    python -m bench.streams [--events 1000] [--concurrency 1,16] [--streams 48]

A handler (:class:`Ticks`) whose ``predict_stream`` yields ``n`` small integers
as fast as a pure-Python generator can is served by ``torchpool serve`` (run
as ``python -m gateway``, the same command, so this tree's code is what runs)
with 2 workers, and read over Server-Sent Events (``POST /predict``,
``Accept: text/event-stream``) by asyncio clients on raw sockets, so no HTTP
library's parsing sits in the numbers. The same generator consumed in-process
gives the floor. At each concurrency ``c``, ``--streams`` streams run in
rounds of ``c`` at once, after one warm-up round.

Reported per concurrency: time to first event (p50, p99, from sending the
request), events per second per stream (median, from the first event to the
end event), events per second over all streams, the gateway's CPU per event,
and the per-event overhead of the gateway + ZeroMQ hop: a stream's time per
event served minus the generator's time per event in-process.

A streaming worker runs one stream at a time, so with 2 workers at most 2 of
the ``c`` streams run at once; the others wait in the gateway's queue, and at
``c`` > 2 their time to first event is mostly that wait.

Writes ``bench/out/streams.md`` (and ``streams.json``) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.bench import machine_info
from bench.common import HOST, OUT, ROOT, VENV_BIN
from bench.load import busy_cpu_seconds, own_cpu_seconds, tree_cpu_seconds
from bench.servers import Server, ServerFailed, ready_torchpool, running

HANDLER = "bench.streams:Ticks"
WORKERS = 2


class Ticks:
    """Yields 0, 1, ..., n-1 for the request row ``[n]``, with no work in between."""

    input_shape = (1,)
    input_dtype = "float32"

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict_stream(self, x: torch.Tensor) -> Iterator[int]:
        yield from range(int(x[0, 0]))


class PacedTicks(Ticks):
    """Yields 0, 1, ..., n-1 for the request row ``[n, interval_s]``, one every
    ``interval_s``: streams long enough to be cut by a kill between two outputs
    (the chaos soak, bench/chaos_soak.py)."""

    input_shape = (2,)

    def predict_stream(self, x: torch.Tensor) -> Iterator[int]:
        count, interval_s = int(x[0, 0]), float(x[0, 1])
        for i in range(count):
            if interval_s:
                time.sleep(interval_s)
            yield i


@dataclass
class Sample:
    """One stream as a client saw it (seconds from sending the request)."""

    first_s: float
    end_s: float
    events: int  # data events, the end event not counted


@dataclass
class Level:
    """The streams of one concurrency."""

    concurrency: int
    streams: int
    ttfe_p50_ms: float
    ttfe_p99_ms: float
    events_per_s_per_stream: float
    events_per_s_total: float
    overhead_us_per_event: float
    gateway_cpu_us_per_event: float
    other_load: float


def request_bytes(port: int, events: int) -> bytes:
    body = json.dumps({"input_tensor": [[events]]}).encode()
    return (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def one_stream(port: int, request: bytes, events: int) -> Sample:
    """Read one stream to its end, timing its first event and its last."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ServerFailed(f"a stream answered {head.decode(errors='replace')!r}")
        # Every event ends in a blank line; JSON data and the chunk framing have none.
        seen, first, last, tail = 0, 0.0, 0.0, b""
        while piece := await reader.read(1 << 16):
            now = time.perf_counter()
            count = (tail + piece).count(b"\n\n")
            if count and not seen:
                first = now
            if count:
                seen, last = seen + count, now
            tail = piece[-1:]
        if seen != events + 1:
            raise ServerFailed(f"a stream had {seen} events, not {events} and the end")
        return Sample(first - started, last - started, events)
    finally:
        writer.close()


async def rounds(port: int, events: int, concurrency: int, count: int) -> list[Sample]:
    request = request_bytes(port, events)
    samples: list[Sample] = []
    while len(samples) < count:
        batch = [one_stream(port, request, events) for _ in range(concurrency)]
        samples += await asyncio.gather(*batch)
    return samples


def check(server: Server, events: int) -> None:
    """One stream read whole must carry the generator's outputs in order, then the end."""
    request = urllib.request.Request(
        server.url + "/predict",
        data=json.dumps({"input_tensor": [[events]]}).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    want = [f'data: {{"output":{i}}}' for i in range(events)]
    if text.split("\n\n") != [*want, "event: end\ndata: {}", ""]:
        raise ServerFailed(f"the stream differs from the generator's outputs: {text[:300]!r}")


def in_process(events: int, repeats: int) -> tuple[float, float]:
    """The generator consumed in-process: median seconds to its first output and per output."""
    handler = Ticks()
    handler.load(torch.device("cpu"))
    x = torch.tensor([[float(events)]])
    firsts, pers = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = handler.predict_stream(x)
        next(outputs)
        first = time.perf_counter()
        for _ in outputs:
            pass
        firsts.append(first - started)
        pers.append((time.perf_counter() - started) / events)
    return statistics.median(firsts), statistics.median(pers)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def measure(
    server: Server, events: int, concurrency: int, count: int, floor_per_event_s: float
) -> Level:
    asyncio.run(rounds(server.port, events, concurrency, concurrency))  # warm-up
    busy0, own0, parent0 = busy_cpu_seconds(), own_cpu_seconds(server), tree_cpu_seconds(server)[1]
    started = time.perf_counter()
    samples = asyncio.run(rounds(server.port, events, concurrency, count))
    wall = time.perf_counter() - started
    busy1, own1, parent1 = busy_cpu_seconds(), own_cpu_seconds(server), tree_cpu_seconds(server)[1]
    total = sum(s.events for s in samples)
    per_stream = statistics.median(s.events / (s.end_s - s.first_s) for s in samples)
    return Level(
        concurrency=concurrency,
        streams=len(samples),
        ttfe_p50_ms=1000 * percentile([s.first_s for s in samples], 0.50),
        ttfe_p99_ms=1000 * percentile([s.first_s for s in samples], 0.99),
        events_per_s_per_stream=per_stream,
        events_per_s_total=total / wall,
        overhead_us_per_event=1e6 * (1 / per_stream - floor_per_event_s),
        gateway_cpu_us_per_event=1e6 * (parent1 - parent0) / total,
        other_load=max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall),
    )


def report(
    started: str, machine: dict[str, str], args: argparse.Namespace, floor: tuple[float, float]
) -> list[str]:
    return [
        "# Streams: served over SSE against the generator in-process",
        "",
        f"Run of {started} (UTC) by `python -m bench.streams --events {args.events} "
        f"--concurrency {args.concurrency} --streams {args.streams}` (`bench/streams.py`).",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        "",
        f"Handler `{HANDLER}`: a pure-Python generator of {args.events} small integers, served "
        f"by `torchpool serve --workers {WORKERS}` (CPU), read by asyncio clients on raw "
        "sockets in this process, one connection per stream. A streaming worker runs one "
        f"stream at a time: at c > {WORKERS}, time to first event is mostly queueing.",
        "",
        f"In-process floor: first output after {1e6 * floor[0]:.2f} us, "
        f"{1e6 * floor[1]:.3f} us per output ({1 / floor[1]:,.0f} outputs/s).",
        "",
        "Overhead per event = a served stream's time per event (median stream) minus the "
        "in-process time per output: the gateway, the ZeroMQ hop, JSON and SSE framing, "
        "credit round trips and the client's reading. Gateway CPU is the `serve` process "
        "alone. Other load: cores used by other processes on the machine meanwhile; on a "
        "shared machine the numbers are noisy.",
        "",
        "| c | streams | TTFE p50 ms | TTFE p99 ms | events/s per stream | events/s total "
        "| overhead us/event | gateway CPU us/event | other load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def row(level: Level) -> str:
    return (
        f"| {level.concurrency} | {level.streams} | {level.ttfe_p50_ms:.2f} "
        f"| {level.ttfe_p99_ms:.2f} | {level.events_per_s_per_stream:,.0f} "
        f"| {level.events_per_s_total:,.0f} | {level.overhead_us_per_event:.1f} "
        f"| {level.gateway_cpu_us_per_event:.1f} | {level.other_load:.2f} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1000, help="outputs per stream")
    parser.add_argument("--concurrency", default="1,16", help="streams at once, per level")
    parser.add_argument("--streams", type=int, default=48, help="measured streams per level")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine = machine_info()
    floor = in_process(args.events, repeats=50)
    server = Server(
        "tp",
        f"torchpool ({WORKERS} workers)",
        [
            str(VENV_BIN / "python"), "-m", "gateway", "--workers", str(WORKERS),
            "--handler", HANDLER, "--timeout-s", "300", "--queue-size", "256",
            "--host", HOST, "--log-level", "warning", "--port", "{port}",
        ],
        {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        ready_torchpool,
        source=ROOT,
    )  # fmt: skip
    lines = report(started, machine, args, floor)
    print("\n".join(lines), flush=True)
    levels: list[Level] = []
    with running(server, out / "logs", "streams"):
        check(server, 5)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            count = concurrency * max(1, math.ceil(args.streams / concurrency))
            levels.append(measure(server, args.events, concurrency, count, floor[1]))
            lines.append(row(levels[-1]))
            print(lines[-1], flush=True)
    (out / "streams.md").write_text("\n".join(lines) + "\n")
    document = {"started": started, "machine": machine, "in_process_s": floor}
    document["levels"] = [asdict(level) for level in levels]
    (out / "streams.json").write_text(json.dumps(document, indent=1))
    print(f"wrote {out / 'streams.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
