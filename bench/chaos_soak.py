"""Chaos soak: every feature at once, under kills, stops and reloads.

    python -m bench.chaos_soak --minutes 20

One gateway serves two models from a config file: ``mlp``, the built-in demo
MLP, batched, on 2 workers, and ``ticks``, a streaming handler
(:class:`bench.streams.PacedTicks`) on 1. Clients post to ``/predict/mlp``
(JSON), ``/v2/models/mlp/infer`` (the Open Inference Protocol) and stream from
``/predict/ticks`` (Server-Sent Events), each answer checked: the MLP's
against answers taken from the calm pool before the chaos, a stream's outputs
against ``0, 1, ..., n-1``. Meanwhile a random worker of either model is
SIGKILLed every 7 s, an MLP worker SIGSTOPped for 3 s every 30 s, and the MLP
reloaded every 40 s. The gateway's RSS, descriptors and threads are sampled
every few seconds; at the end it gets SIGTERM and must exit 0.

The targets and what the rules allow are in :mod:`bench.chaos_report`; the
report is printed and written to bench/out/chaos_soak.md (raw numbers in
chaos_soak.json). Exits 0 when every target is met.
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
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import httpx
import psutil

from bench.chaos_report import ALLOWED, ChaosSoak, GatewaySample, Tally, markdown
from bench.common import HOST, OUT, READY_DEADLINE_S, ROOT, TOLERANCE
from bench.soak import free_port

TOKEN = "chaos-soak"
ROW = 16  # the demo MLP's row width
REFERENCE_ROWS = 8
TIMEOUT_S = 20  # the gateway's deadline; a client waiting past CLIENT_TIMEOUT_S saw a hang
CLIENT_TIMEOUT_S = TIMEOUT_S + 15
KILL_EVERY_S, STOP_EVERY_S, STOP_FOR_S, RELOAD_EVERY_S = 7.0, 30.0, 3.0, 40.0
SAMPLE_S = 5.0
CONFIG = f"""
[server]
admin_token = "{TOKEN}"
timeout_s = {TIMEOUT_S}

[models.mlp]
workers = 2
max_batch_size = 16

[models.ticks]
handler = "bench.streams:PacedTicks"
workers = 1
"""


class Soak:
    def __init__(
        self, port: int, tally: Tally, minutes: float, stop_at: float, rng: random.Random
    ) -> None:
        self.url = f"http://{HOST}:{port}"
        self.tally = tally
        self.minutes = minutes
        self.stop_at = stop_at
        self.rng = rng
        self.reference: list[list[float]] = []
        self.rows = [[round(rng.uniform(-1, 1), 4) for _ in range(ROW)] for _ in range(8)]

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    # --- answers ------------------------------------------------------------------------

    def refused(self, kind: str, response: httpx.Response) -> None:
        """A non-200: allowed by the rules, or a violation."""
        text = response.text
        for (status, phrase), shown in ALLOWED.items():
            if response.status_code == status and phrase in text:
                self.tally.note(kind, shown)
                return
        self.tally.note(kind, f"{response.status_code}")
        at = time.monotonic() - (self.stop_at - self.minutes * 60)
        self.tally.violations.append(f"{kind} at {at:.0f}s: {response.status_code} {text[:300]}")

    def compare(self, kind: str, picks: list[int], got: Any) -> None:
        want = [self.reference[i] for i in picks]
        ok = (
            isinstance(got, list)
            and len(got) == len(want)
            and all(
                len(g) == len(w) and all(abs(a - b) <= TOLERANCE for a, b in zip(g, w, strict=True))
                for g, w in zip(got, want, strict=True)
            )
        )
        self.tally.note(kind, "200")
        if not ok:
            self.tally.wrong.append(f"{kind}: rows {picks} -> {str(got)[:200]}")

    # --- clients ------------------------------------------------------------------------

    async def predict_client(self, client: httpx.AsyncClient, pause_s: float) -> None:
        while self.running():
            picks = [self.rng.randrange(REFERENCE_ROWS) for _ in range(self.rng.randint(1, 4))]
            body = {"input_tensor": [self.rows[i] for i in picks]}
            response = await self._post(client, "predict", "/predict/mlp", json=body)
            if response is not None:
                if response.status_code == 200:
                    self.compare("predict", picks, response.json()["prediction"])
                else:
                    self.refused("predict", response)
            await asyncio.sleep(pause_s)

    async def v2_client(self, client: httpx.AsyncClient, pause_s: float) -> None:
        while self.running():
            picks = [self.rng.randrange(REFERENCE_ROWS) for _ in range(self.rng.randint(1, 4))]
            flat = [v for i in picks for v in self.rows[i]]
            body = {
                "inputs": [
                    {
                        "name": "input__0",
                        "shape": [len(picks), ROW],
                        "datatype": "FP32",
                        "data": flat,
                    }
                ]
            }
            response = await self._post(client, "v2", "/v2/models/mlp/infer", json=body)
            if response is not None:
                if response.status_code == 200:
                    data = response.json()["outputs"][0]["data"]
                    width = len(data) // len(picks)
                    rows = [data[i * width : (i + 1) * width] for i in range(len(picks))]
                    self.compare("v2", picks, rows)
                else:
                    self.refused("v2", response)
            await asyncio.sleep(pause_s)

    async def sse_client(self, client: httpx.AsyncClient) -> None:
        while self.running():
            count = self.rng.randint(0, 12)
            body = {"input_tensor": [[count, 0.02]]}
            headers = {"Accept": "text/event-stream"}
            try:
                async with client.stream(
                    "POST", "/predict/ticks", json=body, headers=headers
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self.refused("sse", response)
                        continue
                    events = [e async for e in _events(response)]
            except httpx.TimeoutException as exc:
                self.tally.hung.append(f"sse: {exc!r}")
                continue
            except httpx.HTTPError as exc:
                self.tally.violations.append(f"sse: no answer: {exc!r}")
                continue
            self._check_stream(count, events)

    def _check_stream(self, count: int, events: list[tuple[str, Any]]) -> None:
        outputs = [data.get("output") for name, data in events if name == "message"]
        last = events[-1][0] if events else None
        if last not in ("end", "error"):
            self.tally.unended.append(f"sse: {count} asked, events {events[-3:]}")
            self.tally.note("sse", "200, no end or error")
            return
        self.tally.note("sse", f"200, {last}")
        expected = list(range(count)) if last == "end" else list(range(len(outputs)))
        if outputs != expected:
            self.tally.wrong.append(f"sse: {count} asked, got {outputs} then {last}")

    async def _post(
        self, client: httpx.AsyncClient, kind: str, path: str, **kwargs: Any
    ) -> httpx.Response | None:
        try:
            return await client.post(path, **kwargs)
        except httpx.TimeoutException as exc:
            self.tally.hung.append(f"{kind}: {exc!r}")
        except httpx.HTTPError as exc:
            self.tally.violations.append(f"{kind}: no answer: {exc!r}")
        return None

    # --- chaos --------------------------------------------------------------------------

    async def workers(self, client: httpx.AsyncClient, model: str | None = None) -> list[int]:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            health = (await client.get("/health")).json()
            return [
                int(w["pid"])
                for w in health["workers"]
                if w["pid"] is not None
                and w["state"] in ("starting", "loading", "ready", "busy")
                and (model is None or w.get("model") == model)
            ]
        return []

    async def killer(self, client: httpx.AsyncClient) -> None:
        while await self._every(KILL_EVERY_S):
            pids = await self.workers(client)
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.tally.chaos["SIGKILL"] += 1

    async def stopper(self, client: httpx.AsyncClient) -> None:
        while await self._every(STOP_EVERY_S):
            pids = await self.workers(client, "mlp")
            if not pids:
                continue
            victim = self.rng.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGSTOP)
                self.tally.chaos["SIGSTOP"] += 1
                await asyncio.sleep(STOP_FOR_S)
                os.kill(victim, signal.SIGCONT)

    async def reloader(self, client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while await self._every(RELOAD_EVERY_S):
            try:
                response = await client.post("/admin/models/mlp/reload", headers=headers)
                # A reload fails when chaos kills one of its new workers: the old serve on.
                self.tally.chaos[f"reload {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                self.tally.violations.append(f"reload: no answer: {exc!r}")

    async def _every(self, seconds: float) -> bool:
        await asyncio.sleep(min(seconds, max(0.0, self.stop_at - time.monotonic())))
        return self.running()


async def _events(response: httpx.Response) -> Any:
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def sample_gateway(pid: int, start: float, stop_at: float, out: list[GatewaySample]) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < stop_at:
        with contextlib.suppress(psutil.Error):
            out.append(
                GatewaySample(
                    round(time.monotonic() - start, 1),
                    process.memory_info().rss,
                    process.num_fds(),
                    process.num_threads(),
                )
            )
        await asyncio.sleep(min(SAMPLE_S, max(0.0, stop_at - time.monotonic())))


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"torchpool serve exited with {proc.returncode}: see {OUT}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/health/ready")).status_code == 200:
                health = (await client.get("/health")).json()
                if health["ready_workers"] == 3:
                    return
        await asyncio.sleep(0.5)
    raise SystemExit(f"torchpool serve was not ready within {READY_DEADLINE_S:.0f} s")


async def run(minutes: float, clients: int, sse_clients: int, rate: float, seed: int) -> ChaosSoak:
    """The whole soak; the result with its verdicts."""
    OUT.mkdir(parents=True, exist_ok=True)
    config = OUT / "chaos_soak.toml"
    config.write_text(CONFIG)
    port = free_port()
    log = (OUT / "chaos_soak-server.log").open("wb")
    argv = [sys.executable, "-m", "gateway", "--config", str(config), "--host", HOST]
    proc = subprocess.Popen(
        [*argv, "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tally, samples = Tally(), list[GatewaySample]()
    stop_s: float | None = None
    warmup_s = min(120.0, minutes * 60 / 4)
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends: at the same
    # 5 s, a request sent just as the server closes one fails in the client.
    limits = httpx.Limits(max_connections=clients + sse_clients + 4, keepalive_expiry=2.0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", timeout=CLIENT_TIMEOUT_S, limits=limits
        ) as client:
            await wait_ready(client, proc)
            start = time.monotonic()
            soak = Soak(port, tally, minutes, start + minutes * 60, random.Random(seed))
            for row in soak.rows:  # the calm pool's answers are the reference
                answer = await client.post("/predict/mlp", json={"input_tensor": [row]})
                answer.raise_for_status()
                soak.reference.append(answer.json()["prediction"][0])
            pause = clients / rate
            v2_clients = max(1, clients // 4)
            await asyncio.gather(
                sample_gateway(proc.pid, start, soak.stop_at, samples),
                soak.killer(client),
                soak.stopper(client),
                soak.reloader(client),
                *(soak.predict_client(client, pause) for _ in range(clients - v2_clients)),
                *(soak.v2_client(client, pause) for _ in range(v2_clients)),
                *(soak.sse_client(client) for _ in range(sse_clients)),
            )
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = proc.wait(60)
            stop_s = time.monotonic() - stopping
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        log.close()
    return ChaosSoak(
        minutes=minutes,
        warmup_s=warmup_s,
        started=started,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        command=f"python -m bench.chaos_soak --minutes {minutes:g}",
        tally=tally,
        samples=samples,
        exit_code=code,
        stop_s=stop_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the chaos")
    parser.add_argument("--clients", type=int, default=8, help="predict and v2 clients")
    parser.add_argument("--sse-clients", type=int, default=2, help="streaming clients")
    parser.add_argument("--rate", type=float, default=80.0, help="predict + v2 requests/s at most")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.minutes, args.clients, args.sse_clients, args.rate, args.seed))
    text = markdown(result)
    (OUT / "chaos_soak.md").write_text(text)
    (OUT / "chaos_soak.json").write_text(json.dumps(result.to_json(), indent=1))
    print(text)
    return 0 if result.passed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
