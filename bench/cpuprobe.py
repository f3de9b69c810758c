"""Where a server's CPU goes per request: each thread's CPU time and the context switches.

    bench/.venv/bin/python -m bench.cpuprobe [--model small] [--server tp] [--concurrency 8]

Starts one server of the benchmark (torchpool by default; ``recipe2`` is
``uvicorn --workers 2``), warms it up for 2 s, then reads every server
thread's CPU time and context switches from ``/proc`` around one wrk run.
Prints req/s and latency, the CPU microseconds each thread spent per answered
request, and the context switches of all server threads per request (wrk's
own are not counted). ``--unpin`` resets the workers' affinity to every core
after start, to see what pinning costs on a machine shared with the load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import psutil

from bench import models
from bench.common import OUT
from bench.load import parse_wrk, wrk_argv
from bench.servers import running, server_specs, tree

WARMUP_S = 2.0

# (process index in the server's tree, thread name, thread id) -> seconds.
Times = dict[tuple[int, str, int], float]


def thread_times(procs: list[psutil.Process]) -> Times:
    times: Times = {}
    for index, proc in enumerate(procs):
        for thread in proc.threads():
            name = Path(f"/proc/{proc.pid}/task/{thread.id}/comm").read_text().strip()
            times[(index, name, thread.id)] = thread.user_time + thread.system_time
    return times


def context_switches(procs: list[psutil.Process]) -> int:
    """Voluntary and involuntary switches of every thread of ``procs`` so far."""
    total = 0
    for proc in procs:
        for thread in proc.threads():
            status = Path(f"/proc/{proc.pid}/task/{thread.id}/status").read_text()
            for line in status.splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="small", choices=sorted(models.MODELS))
    parser.add_argument("--server", default="tp")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--unpin", action="store_true", help="let the workers run on any core")
    args = parser.parse_args()
    out = OUT / "cpuprobe"
    out.mkdir(parents=True, exist_ok=True)
    weights = models.save(args.model, OUT / "weights")
    body = models.write_body(args.model, out)
    env = {"BENCH_BODY": str(body), "PATH": "/usr/bin:/bin"}
    (server,) = server_specs(args.model, weights, [args.server])
    with running(server, out, args.model):
        procs = tree(server)
        if args.unpin:
            for proc in procs[1:]:
                for thread in proc.threads():
                    os.sched_setaffinity(thread.id, range(os.cpu_count() or 1))
        url = server.url + "/predict"
        subprocess.run(wrk_argv(args.concurrency, WARMUP_S, url), env=env, capture_output=True)
        before, switches_before = thread_times(procs), context_switches(procs)
        load = subprocess.run(
            wrk_argv(args.concurrency, args.seconds, url), env=env, capture_output=True, text=True
        )
        after, switches_after = thread_times(procs), context_switches(procs)
    result = parse_wrk(load.stdout)
    answered = result["requests"]
    if not answered:
        print(load.stdout, file=sys.stderr)
        return 1
    spent = {key: seconds - before.get(key, 0.0) for key, seconds in after.items()}
    print(
        f"{args.model} {server.label} c={args.concurrency}: {result['requests_per_s']:.0f} req/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, non-2xx {result['non_2xx']:.0f}; "
        f"CPU {1e6 * sum(spent.values()) / answered:.0f} us/request, "
        f"{(switches_after - switches_before) / answered:.1f} context switches/request"
    )
    for (index, name, _), seconds in sorted(spent.items()):
        if seconds > 0.005:
            print(f"  process {index} {name:<16} {1e6 * seconds / answered:6.0f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
