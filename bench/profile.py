"""Where torchpool's time goes under load: py-spy on the gateway and one worker.

    bench/.venv/bin/python -m bench.profile [--model small] [--server tp] [--seconds 8]

Starts one server of the benchmark (torchpool by default), drives it with wrk
at 64 connections, and samples the gateway (the server's own process) and its
first child with ``py-spy record --nonblocking`` at the same time. Writes the
collapsed stacks to ``bench/out/profile/`` and prints, per process, the
functions that hold the most samples (self time, and inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

from bench import models
from bench.common import OUT, VENV_BIN
from bench.load import wrk_argv
from bench.servers import running, server_specs, tree


def summarize(path: Path, top: int) -> str:
    """Top functions of a py-spy ``raw`` (collapsed) file: self and inclusive shares."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{path.name}: {total} samples"]
    lines.append("  self:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="small", choices=sorted(models.MODELS))
    parser.add_argument("--server", default="tp")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true", help="sample py-spy's --idle frames too")
    args = parser.parse_args()
    out = OUT / "profile"
    out.mkdir(parents=True, exist_ok=True)
    weights = models.save(args.model, OUT / "weights")
    body_file = models.write_body(args.model, OUT)
    (server,) = server_specs(args.model, weights, [args.server])
    with running(server, out, args.model):
        procs = tree(server)
        targets = {"gateway": procs[0].pid}
        if len(procs) > 1:
            targets["worker"] = procs[1].pid
        load = subprocess.Popen(
            wrk_argv(args.concurrency, args.seconds + 3, server.url + "/predict"),
            env={"BENCH_BODY": str(body_file), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # let the load settle before sampling
        spies = {}
        for name, pid in targets.items():
            argv = [str(VENV_BIN / "py-spy"), "record", "--nonblocking", "-f", "raw"]
            argv += ["-r", str(args.rate), "-d", str(int(args.seconds)), "-p", str(pid)]
            argv += ["-o", str(out / f"{args.model}-{args.server}-{name}.txt")]
            if args.idle:
                argv.append("--idle")
            spies[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for spy in spies.values():
            spy.wait(timeout=args.seconds + 30)
        stdout, _ = load.communicate(timeout=args.seconds + 30)
    print(stdout)
    for name in spies:
        print(summarize(out / f"{args.model}-{args.server}-{name}.txt", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
