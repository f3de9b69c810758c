"""Soak: `torchpool serve` under steady mixed load for a while; do memory or descriptors grow?

    python -m bench.soak --minutes 20

Starts `torchpool serve` (demo model, two workers, a free port) and drives
it on loopback with a fixed number of clients paced to a fixed rate: mostly
valid requests, some invalid ones (bad JSON, NaN, a wrong shape, a wrong
content type) and some clients that hang up before reading the answer or
in the middle of the body. Every few seconds it reads each process's RSS,
open descriptors and sockets. The report (printed, and written to
bench/out/soak.md; raw numbers in bench/out/soak.json) gives the RSS slope of
each process past the warm-up, descriptors at rest before and after, every
answer by kind, status and error code, and the verdict against the targets in
:mod:`bench.soak_report`. Exits 0 when every target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import httpx
import psutil

from bench.common import HOST, OUT, READY_DEADLINE_S, ROOT, STOP_GRACE_S
from bench.soak_report import DISCONNECTS, Outcomes, Process, Sample, Soak, markdown

ROW = 16  # the demo model's row width
# How often each kind of request is sent, in parts of the whole.
MIX: dict[str, int] = {
    "valid": 70,
    "bad_json": 5,
    "nan": 5,
    "wrong_shape": 5,
    "wrong_type": 5,
    "hangup_after_request": 5,
    "hangup_mid_body": 5,
}
REQUEST_TIMEOUT_S = 30.0
SETTLE_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --- the server -------------------------------------------------------------------------


def start_server(port: int, workers: int) -> subprocess.Popen[bytes]:
    OUT.mkdir(parents=True, exist_ok=True)
    log = (OUT / "soak-server.log").open("wb")
    argv = [sys.executable, "-m", "gateway", "--workers", str(workers), "--host", HOST]
    argv += ["--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], n: int) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"torchpool serve exited with {proc.returncode}: see {OUT}")
        with contextlib.suppress(httpx.HTTPError):
            health = (await client.get("/health")).json()
            if health.get("ready_workers") == n:
                return
        await asyncio.sleep(0.5)
    raise SystemExit(f"torchpool serve was not ready within {READY_DEADLINE_S:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- what each process holds --------------------------------------------------------------


def descriptors(pid: int) -> tuple[int, int]:
    """Open descriptors and, among them, sockets."""
    folder = f"/proc/{pid}/fd"
    if os.path.isdir(folder):
        fds = sockets = 0
        for name in os.listdir(folder):
            with contextlib.suppress(OSError):  # closed while we looked
                target = os.readlink(f"{folder}/{name}")
                fds += 1
                sockets += target.startswith("socket:")
        return fds, sockets
    proc = psutil.Process(pid)
    return proc.num_fds(), len(proc.net_connections(kind="all"))


def sample(proc: Process, t_s: float) -> None:
    with contextlib.suppress(psutil.Error, OSError):
        rss = psutil.Process(proc.pid).memory_info().rss
        fds, sockets = descriptors(proc.pid)
        proc.samples.append(Sample(round(t_s, 2), rss, fds, sockets))


async def at_rest(procs: Sequence[Process], before: bool) -> None:
    """Descriptors once they stop changing (and, after the load, no more than before)."""
    deadline = time.monotonic() + SETTLE_S
    last: list[tuple[int, int]] = []
    while True:
        now = [descriptors(p.pid) for p in procs]
        settled = now == last and (
            before or all(n <= p.rest_before for n, p in zip(now, procs, strict=True))
        )
        if settled or time.monotonic() > deadline:
            for proc, counts in zip(procs, now, strict=True):
                if before:
                    proc.rest_before = counts
                else:
                    proc.rest_after = counts
            return
        last = now
        await asyncio.sleep(0.5)


async def sampler(
    client: httpx.AsyncClient, procs: list[Process], start: float, every_s: float, stop: float
) -> None:
    while time.monotonic() < stop:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = (await client.get("/health")).json()["workers"]
            for worker, proc in zip(workers, procs[1:], strict=False):
                if worker["pid"] not in (proc.pid, *proc.replaced_by, None):
                    proc.replaced_by.append(worker["pid"])
        for proc in procs:
            sample(proc, time.monotonic() - start)
        await asyncio.sleep(max(0.0, min(every_s, stop - time.monotonic())))


# --- the load -----------------------------------------------------------------------------


def body(kind: str, rng: random.Random) -> tuple[bytes, str]:
    """The body and content type of one request of ``kind``."""
    rows = [[round(rng.uniform(-1, 1), 4) for _ in range(ROW)] for _ in range(rng.randint(1, 4))]
    if kind == "bad_json":
        return b'{"input_tensor": [[1.0, 2.0', "application/json"
    if kind == "nan":
        return b'{"input_tensor": [[' + b", ".join([b"NaN"] * ROW) + b"]]}", "application/json"
    if kind == "wrong_shape":
        rows = [row[:5] for row in rows]
    payload = json.dumps({"input_tensor": rows}).encode()
    return payload, "text/plain" if kind == "wrong_type" else "application/json"


async def hang_up(port: int, kind: str, payload: bytes) -> None:
    """A client that leaves early: after the whole request, or half-way through its body."""
    _, writer = await asyncio.open_connection(HOST, port)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    writer.write(head + (payload if kind == "hangup_after_request" else payload[:10]))
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def one_request(
    kind: str, rng: random.Random, client: httpx.AsyncClient, port: int, out: Outcomes
) -> None:
    """Send one request of ``kind`` and record what came back."""
    payload, content_type = body(kind, rng)
    if kind in DISCONNECTS:
        try:
            await hang_up(port, kind, payload)
            out.record(kind, "hung up")
        except OSError as exc:
            out.record(kind, type(exc).__name__)
        return
    started = time.monotonic()
    try:
        response = await client.post(
            "/predict", content=payload, headers={"Content-Type": content_type}
        )
    except httpx.HTTPError as exc:
        out.record(kind, type(exc).__name__)
        return
    if response.status_code == 200:
        out.record(kind, "200")
        if kind == "valid":
            out.valid_ms.append((time.monotonic() - started) * 1000)
        return
    code = ""
    with contextlib.suppress(ValueError, AttributeError):
        code = str(response.json().get("code", ""))
    out.record(kind, str(response.status_code), code)


async def client_loop(
    n: int, client: httpx.AsyncClient, port: int, interval_s: float, stop: float, out: Outcomes
) -> None:
    rng = random.Random(n)
    kinds, weights = list(MIX), list(MIX.values())
    # Spread the clients' first requests over one interval, then keep each on its pace.
    due = time.monotonic() + interval_s * rng.random()
    while True:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if time.monotonic() >= stop:
            return
        due = max(due + interval_s, time.monotonic())
        await one_request(rng.choices(kinds, weights)[0], rng, client, port, out)


async def soak(args: argparse.Namespace) -> Soak:
    port = free_port()
    proc = start_server(port, args.workers)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", timeout=REQUEST_TIMEOUT_S, limits=limits
        ) as client:
            await wait_ready(client, proc, args.workers)
            workers = (await client.get("/health")).json()["workers"]
            procs = [Process("gateway", proc.pid)]
            procs += [Process(f"worker {w['id']}", int(w["pid"])) for w in workers]
            # One request of each kind first, so what opens lazily is open at rest.
            primer = Outcomes()
            for kind in MIX:
                await one_request(kind, random.Random(0), client, port, primer)
            if primer.unexpected():
                raise SystemExit(f"the first requests got unexpected answers: {primer.answers}")
        await at_rest(procs, before=True)
        outcomes = Outcomes()
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", timeout=REQUEST_TIMEOUT_S, limits=limits
        ) as client:
            start = time.monotonic()
            stop = start + args.minutes * 60
            interval = args.clients / args.rate
            await asyncio.gather(
                sampler(client, procs, start, args.sample_s, stop),
                *(
                    client_loop(n, client, port, interval, stop, outcomes)
                    for n in range(args.clients)
                ),
            )
            load_s = time.monotonic() - start
        await at_rest(procs, before=False)
    finally:
        stop_server(proc)
    warmup_s = args.warmup_s if args.warmup_s is not None else min(180.0, args.minutes * 15)
    return Soak(
        minutes=args.minutes,
        warmup_s=warmup_s,
        workers=args.workers,
        clients=args.clients,
        rate=args.rate,
        sample_s=args.sample_s,
        started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        processes=procs,
        outcomes=outcomes,
        load_s=load_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s, all clients")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="seconds left out of the slopes (default: a quarter of the run, at most 180)",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    text = markdown(result)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.md").write_text(text)
    (OUT / "soak.json").write_text(json.dumps(result.to_json(), indent=1))
    print(text)
    return 0 if result.passed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
