"""Shared weights (issue #21): memory, replacement time and throughput, sharing on and off.

    PYTHONPATH=. python -m bench.sharedweights [--kinds state_dict,torchscript,text]
        [--duration 3] [--rounds 2] [--concurrency 1,8,32]

Three model kinds, each served by:

- the one-process recipe (``bench/peers/recipe.py``, or ``realrecipe.py`` for text)
  and the same under ``uvicorn --workers 2``;
- torchpool with 2 and 4 workers, sharing on and off (``--no-shared-weights``).

Kinds: a seeded MLP of 411 MB float32 weights (``bench.models.Big``, no download)
as a state_dict + ``--model-class`` and as a TorchScript archive, and the text
encoder handler (``examples/text_embedding.py``, MiniLM-L6 shaped, seeded).

Memory is each process's PSS, split into private (USS) and shared parts, after
every worker has served (a mapped page counts only once touched). A
replacement's READY time is the ``load_seconds`` /health reports after its
predecessor was killed with SIGKILL. Throughput: a Python client with one
keep-alive connection per concurrent caller, on and off alternated ``--rounds``
times. Writes ``bench/out/sharedweights/results.json`` and prints Markdown
tables for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import psutil
import torch

from bench import models
from bench.common import HOST, MB, OUT, ROOT, VENV_BIN
from bench.servers import Server, http, ready_uvicorn, start, stop
from examples import demo_models

KINDS = ("state_dict", "torchscript", "text")
RESULTS = OUT / "sharedweights"


@dataclass
class Proc:
    role: str
    pid: int
    rss_mb: float
    pss_mb: float
    private_mb: float
    shared_mb: float  # this process's share of pages others map too (pss - private)


@dataclass
class Sample:
    kind: str
    server: str
    procs: list[Proc]
    first_load_s: list[float] = field(default_factory=list)
    replacement_load_s: float | None = None
    # The model part of each (weights.load_s: torch imported already).
    first_model_s: list[float] = field(default_factory=list)
    replacement_model_s: float | None = None

    @property
    def pss_mb(self) -> float:
        return sum(p.pss_mb for p in self.procs)


@dataclass
class Throughput:
    kind: str
    arm: str  # on or off
    round: int
    concurrency: int
    requests_per_s: float


class Kind:
    """One model kind's files, request body and server command lines."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "text":
            model_dir = folder / "minilm-shaped"
            if not (model_dir / "config.json").exists():
                demo_models.save_text_model(model_dir)
            self.body = json.dumps({"input_tensor": demo_models.sentences(1)[0]}).encode()
            self.recipe_app = "bench.peers.realrecipe:text_app"
            self.recipe_env = {"BENCH_TEXT_DIR": str(model_dir), "HF_HUB_OFFLINE": "1"}
            self.model_flags = [
                "--handler", "examples.text_embedding:TextEmbedder",
                "--model-kwargs", json.dumps({"model_dir": str(model_dir)}),
            ]  # fmt: skip
            return
        path = folder / ("big.pt" if name == "state_dict" else f"big{models.TORCHSCRIPT_SUFFIX}")
        if not path.exists():
            model = models.build("big")
            if name == "state_dict":
                torch.save(model.state_dict(), path)
            else:
                torch.jit.script(model).save(str(path))  # type: ignore[no-untyped-call]
        self.body = json.dumps({"input_tensor": models.example_row("big")}).encode()
        self.recipe_app = "bench.peers.recipe:app"
        self.recipe_env = {"BENCH_MODEL": "big", "BENCH_WEIGHTS": str(path)}
        self.model_flags = ["--model", str(path), "--input-shape", "512"]
        if name == "state_dict":
            self.model_flags += ["--model-class", "bench.models:Big"]

    def recipe(self, workers: int) -> Server:
        argv = [str(VENV_BIN / "python"), "-m", "uvicorn", self.recipe_app, "--host", HOST]
        if workers > 1:
            argv += ["--workers", str(workers)]
        argv += ["--no-access-log", "--port", "{port}"]
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        label = "recipe (1 process)" if workers == 1 else f"uvicorn --workers {workers}"
        key = f"recipe{workers}"
        return Server(key, label, argv, {**self.recipe_env, **threads}, ready_uvicorn(workers))

    def torchpool(self, workers: int, shared: bool) -> Server:
        argv = [
            str(VENV_BIN / "python"), "-m", "gateway", "--workers", str(workers),
            *self.model_flags, "--max-batch-size", "16", "--max-batch-delay-ms", "2",
            "--host", HOST, "--log-level", "warning", "--port", "{port}",
        ]  # fmt: skip
        if not shared:
            argv.append("--no-shared-weights")
        arm = "on" if shared else "off"
        label = f"torchpool {workers} workers, sharing {arm}"
        env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        return Server(f"tp{workers}-{arm}", label, argv, env, ready_all(workers))


def ready_all(workers: int) -> Any:
    def ready(server: Server) -> bool:
        with contextlib.suppress(OSError, ValueError):
            status, body = http("GET", server.url + "/health", timeout=2)
            return status == 200 and json.loads(body).get("ready_workers") == workers
        return False

    return ready


def health(server: Server) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(http("GET", server.url + "/health", timeout=10)[1])
    return document


def post(server: Server, body: bytes) -> int:
    connection = HTTPConnection(HOST, server.port, timeout=60)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def warm(server: Server, kind: Kind, torchpool: bool, deadline_s: float = 120.0) -> None:
    """Requests until every worker has served (a mapped weight counts once touched)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        threads = [threading.Thread(target=post, args=(server, kind.body)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not torchpool:
            return
        if all(w["requests_served"] > 0 for w in health(server)["workers"]):
            return
    raise SystemExit(f"{server.label}: some worker never served")


def processes(server: Server) -> list[Proc]:
    assert server.proc is not None
    parent = psutil.Process(server.proc.pid)
    found = []
    for index, proc in enumerate([parent, *parent.children(recursive=True)]):
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            role = "parent" if index == 0 else f"child {proc.pid}"
            found.append(
                Proc(
                    role,
                    proc.pid,
                    info.rss / MB,
                    info.pss / MB,
                    info.uss / MB,
                    (info.pss - info.uss) / MB,
                )
            )
    return found


def replace_one(server: Server) -> tuple[float, float]:
    """SIGKILL worker 1; the load_seconds of the worker that replaces it, and its model part."""
    victim = health(server)["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        worker = health(server)["workers"][1]
        if worker["state"] in ("ready", "busy") and worker["pid"] not in (None, victim):
            return float(worker["load_seconds"]), float(worker["weights"]["load_s"])
        time.sleep(0.1)
    raise SystemExit(f"{server.label}: no replacement within 180 s")


def load_for(server: Server, body: bytes, concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` keep-alive callers for ``seconds``."""
    done = [0] * concurrency
    stop_at = time.monotonic() + seconds

    def caller(index: int) -> None:
        connection = HTTPConnection(HOST, server.port, timeout=60)
        while time.monotonic() < stop_at:
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                done[index] += 1
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


@contextlib.contextmanager
def serving(server: Server, kind: str) -> Iterator[Server]:
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start(server, logs, kind)
    try:
        yield server
    finally:
        stop(server)


def measure_kind(kind: Kind, args: argparse.Namespace) -> tuple[list[Sample], list[Throughput]]:
    samples: list[Sample] = []
    runs: list[Throughput] = []
    for workers in (1, 2):
        with serving(kind.recipe(workers), kind.name) as server:
            warm(server, kind, torchpool=False)
            samples.append(Sample(kind.name, server.label, processes(server)))
            print(f"  {server.label}: {samples[-1].pss_mb:.0f} MB PSS", flush=True)
    for round_ in range(args.rounds):
        for shared in (True, False):
            with serving(kind.torchpool(2, shared), kind.name) as server:
                warm(server, kind, torchpool=True)
                arm = "on" if shared else "off"
                for concurrency in args.concurrency:
                    rate = load_for(server, kind.body, concurrency, args.duration)
                    runs.append(Throughput(kind.name, arm, round_, concurrency, rate))
                    print(f"  {server.label} c={concurrency}: {rate:.1f} req/s", flush=True)
                if round_ == 0:
                    sample = Sample(kind.name, server.label, processes(server))
                    workers = health(server)["workers"]
                    sample.first_load_s = [w["load_seconds"] for w in workers]
                    sample.first_model_s = [w["weights"]["load_s"] for w in workers]
                    replaced = replace_one(server)
                    sample.replacement_load_s, sample.replacement_model_s = replaced
                    samples.append(sample)
                    print(
                        f"  {server.label}: {sample.pss_mb:.0f} MB PSS, loads "
                        f"{sample.first_load_s}, replacement {sample.replacement_load_s} s",
                        flush=True,
                    )
    for shared in (True, False):
        with serving(kind.torchpool(4, shared), kind.name) as server:
            warm(server, kind, torchpool=True)
            samples.append(Sample(kind.name, server.label, processes(server)))
            print(f"  {server.label}: {samples[-1].pss_mb:.0f} MB PSS", flush=True)
    return samples, runs


def tables(samples: Sequence[Sample], runs: Sequence[Throughput]) -> str:
    lines = [
        "| kind | server | total PSS MB | x recipe | per process: PSS = private + shared MB |",
        "|---|---|---:|---:|---|",
    ]
    for sample in samples:
        recipe = next(s for s in samples if s.kind == sample.kind and s.server.startswith("recipe"))
        parts = ", ".join(
            f"{p.pss_mb:.0f} = {p.private_mb:.0f} + {p.shared_mb:.0f}" for p in sample.procs
        )
        lines.append(
            f"| {sample.kind} | {sample.server} | {sample.pss_mb:.0f} | "
            f"{sample.pss_mb / recipe.pss_mb:.2f} | {parts} |"
        )
    lines += [
        "",
        "| kind | server | first loads s (model part) | replacement READY s (model part) "
        "| replacement / first | model part: replacement / first |",
        "|---|---|---|---|---:|---:|",
    ]
    for sample in samples:
        if sample.replacement_load_s is None or sample.replacement_model_s is None:
            continue
        first = max(sample.first_load_s)
        first_model = max(sample.first_model_s)
        loads = ", ".join(
            f"{a:.2f} ({b:.2f})"
            for a, b in zip(sample.first_load_s, sample.first_model_s, strict=True)
        )
        lines.append(
            f"| {sample.kind} | {sample.server} | {loads} | {sample.replacement_load_s:.2f} "
            f"({sample.replacement_model_s:.2f}) | {sample.replacement_load_s / first:.0%} | "
            f"{sample.replacement_model_s / first_model:.0%} |"
        )
    lines += [
        "",
        "| kind | c | sharing on req/s (runs) | sharing off req/s (runs) |",
        "|---|---:|---|---|",
    ]
    for kind in dict.fromkeys(r.kind for r in runs):
        for concurrency in dict.fromkeys(r.concurrency for r in runs):
            cells = []
            for arm in ("on", "off"):
                rates = [
                    r.requests_per_s
                    for r in runs
                    if (r.kind, r.arm, r.concurrency) == (kind, arm, concurrency)
                ]
                cells.append(
                    f"{statistics.mean(rates):.1f} ({', '.join(f'{x:.1f}' for x in rates)})"
                )
            lines.append(f"| {kind} | {concurrency} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    runs: list[Throughput] = []
    for name in args.kinds.split(","):
        print(f"{name}:", flush=True)
        kind = Kind(name, RESULTS / "models")
        more_samples, more_runs = measure_kind(kind, args)
        samples += more_samples
        runs += more_runs
        (RESULTS / "results.json").write_text(
            json.dumps({"samples": [asdict(s) for s in samples], "runs": [asdict(r) for r in runs]})
        )
    print(tables(samples, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
