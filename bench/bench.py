"""torchpool against its peers, side by side on this machine: throughput, latency, memory.

Run through ``bench/run.sh`` (which prepares ``bench/.venv`` and wrk), or directly:

    bench/.venv/bin/python -m bench.bench [--duration 8] [--models heavy,small] [--servers ...]

For each model x server x concurrency: a short warm-up, then one measured
``wrk`` run against 127.0.0.1. Every server is checked for the right numbers
before it is measured, and its whole process tree is measured for memory after
its runs. Writes ``bench/RESULTS.md`` and raw JSON under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import psutil
import torch

from bench import models
from bench.common import BENCH, OUT, ROOT, SERVER_KEYS, Ceiling, Results, Run
from bench.load import (
    QuietGate,
    busy_cpu_seconds,
    own_cpu_seconds,
    parse_wrk,
    tree_cpu_seconds,
    wrk,
    wrk_argv,
)
from bench.report import report
from bench.servers import Server, ServerFailed, check_answer, memory, running, server_specs


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    versions = {}
    for name in ("litserve", "fastapi", "uvicorn", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "nproc": str(os.cpu_count()),
        "usable cores": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?",
        **versions,
    }


# --- the in-process ceiling -----------------------------------------------------------


def ceiling(name: str, model: torch.nn.Module, batch: int, seconds: float = 1.0) -> Ceiling:
    """Rows per second of ``model``'s forward on one thread at ``batch`` rows."""
    x = torch.rand(batch, models.MODELS[name].inputs)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        count = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            model(x)
            count += 1
    return Ceiling(name, batch, count * batch / elapsed, elapsed * 1000 / count)


# --- servers ----------------------------------------------------------------------------


def measure(
    server: Server,
    name: str,
    body: bytes,
    expected: list[list[float]],
    body_file: Path,
    concurrencies: Sequence[int],
    args: argparse.Namespace,
    gate: QuietGate,
    results: Results,
) -> None:
    """Start ``server``, check its numbers, run wrk at each concurrency, take its memory."""
    out: Path = args.out
    logs = out / "logs"
    with running(server, logs, name):
        check_answer(server, body, expected)
        url = server.url + "/predict"
        for concurrency in concurrencies:
            gate.wait(server)
            wrk(concurrency, args.warmup, url, body_file)
            busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            tree0, parent0 = tree_cpu_seconds(server)
            output = wrk(concurrency, args.duration, url, body_file)
            tree1, parent1 = tree_cpu_seconds(server)
            busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
            (out / f"wrk-{name}-{server.key}-c{concurrency}.txt").write_text(output)
            parsed = parse_wrk(output)
            run = Run(
                name,
                server.label,
                concurrency,
                parsed["requests_per_s"],
                parsed["p50_ms"],
                parsed["p99_ms"],
                int(parsed["requests"]),
                int(parsed["non_2xx"]),
                int(parsed["socket_errors"]),
                round(other, 2),
                1000 * (tree1 - tree0) / max(1, parsed["requests"]),
                1000 * (parent1 - parent0) / max(1, parsed["requests"]),
                output,
            )
            results.runs.append(run)
            print(
                f"   c={concurrency:<3} {run.requests_per_s:9.0f} req/s  "
                f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
                f"errors {run.errors}  other load {run.other_load:.2f} cores  "
                f"cpu/req {run.cpu_ms_per_request:.3f} ms "
                f"(parent {run.parent_cpu_ms_per_request:.3f})",
                flush=True,
            )
        results.memory.append(memory(server, name))
        print(f"   memory {results.memory[-1]}", flush=True)


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--models", default="heavy,small")
    parser.add_argument("--servers", default=",".join(SERVER_KEYS))
    parser.add_argument(
        "--quiet-limit",
        type=float,
        default=0.25,
        help="before each run, wait until other processes use fewer cores than this",
    )
    parser.add_argument(
        "--quiet-budget", type=float, default=150.0, help="most seconds spent waiting in all"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="run the servers from this copy of the tree (e.g. an export of git HEAD)",
    )
    parser.add_argument("--source-label", default="", help="what --source is, for the report")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model_names = args.models.split(",")
    keys = args.servers.split(",")
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    gate = QuietGate(args.quiet_limit, args.quiet_budget, per_run_s=20.0)
    torch.set_num_threads(1)
    results = Results(
        started=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(),
    )
    results.notes.append(
        "uvicorn runs with `--no-access-log` (torchpool logs no access lines either); "
        "LitServe with `log_level='warning'`, `access_log=False`, uvloop and httptools."
    )
    results.notes.append(
        "LitServe: `fast_queue=True` is passed as documented, but 0.2.19 builds its "
        "`TransportConfig(transport_config=...)` with a misspelt keyword (the field is "
        "`transport_type`), so replies still travel over its multiprocessing Manager queues."
    )
    label = args.source_label
    if not label:
        described = subprocess.run(
            ["git", "-C", str(args.source), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
        label = f"git {described.stdout.strip() or '?'} at {args.source}"
    results.machine["torchpool source"] = label
    print(f"machine: {results.machine}", flush=True)
    for name in model_names:
        weights = models.save(name, out / "weights")
        model = models.build(name)
        for batch in (1, 16):
            results.ceilings.append(ceiling(name, model, batch))
            print(f"ceiling {results.ceilings[-1]}", flush=True)
    for name in model_names:
        weights = out / "weights" / f"{name}.pt"
        model = models.build(name)
        row = models.example_row(name)
        with torch.inference_mode():
            expected: list[list[float]] = model(torch.tensor(row)).tolist()
        body_file = out / f"body-{name}.json"
        body = json.dumps({"input_tensor": row}).encode()
        body_file.write_bytes(body)
        for server in server_specs(name, weights, keys, args.source):
            command = (
                shlex.join(server.argv).replace(str(weights), "W").replace(str(ROOT) + "/", "")
            )
            results.commands.setdefault(
                server.label, command.replace("'{port}'", "PORT").replace("{port}", "PORT")
            )
            print(f"== {name} / {server.label}", flush=True)
            try:
                measure(server, name, body, expected, body_file, concurrencies, args, gate, results)
            except ServerFailed as exc:
                print(f"   FAILED: {exc}", flush=True)
                results.notes.append(
                    f"{name} / {server.label} could not be measured: "
                    + str(exc).splitlines()[0]
                    + f" (log: bench/out/logs/{name}-{server.key}.log)"
                )
            results.seconds = time.monotonic() - began
            (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    results.commands["wrk"] = (
        shlex.join(wrk_argv(64, args.duration, "http://127.0.0.1:PORT/predict"))
        .replace(str(ROOT) + "/", "")
        .replace("-c64", "-cC")
        + "  (BENCH_BODY=bench/out/body-MODEL.json)"
    )
    results.seconds = time.monotonic() - began
    noisy = sum(1 for run in results.runs if run.other_load > args.quiet_limit)
    results.notes.append(
        f"Other jobs on the machine: before each run the driver waited (at most 20 s per "
        f"run, {args.quiet_budget:g} s in all; {gate.waited_s:.0f} s spent) for other "
        f"processes to use under {args.quiet_limit:g} cores. {noisy} of {len(results.runs)} "
        "runs still had more (see the other load column); treat those rows with care."
    )
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    text = report(results, concurrencies)
    args.results.write_text(text)
    print(text[text.index("## Targets") :], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
