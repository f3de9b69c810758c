"""What a lend costs and gains under each OpenMP wait policy, on two cores.

    bench/.venv/bin/python -m bench.lendprobe [--passes 40]

For each setting (torch's default spinning wait, ``OMP_WAIT_POLICY=PASSIVE``,
``GOMP_SPINCOUNT=10000``) a fresh process pinned to core 0 with one thread
runs matrix products of two sizes, alternating three kinds of pass:

- ``own``: one thread on core 0 (no lend);
- ``lent``: two threads over cores 0 and 1, as :class:`worker.lending.TorchThreads`
  sets them, then narrowed back;
- ``after``: one thread on core 0 right after a lent pass, when the lent
  thread may still be spinning: what the borrower pays for having lent.

While it runs, a second process pinned to core 1 (the lender) is mostly
idle, as a lender is: every few milliseconds it times one small one-thread
product. Its slowdown beside the lends (its passes that land in a lent pass,
or just after one while the lent thread may spin) is what lending costs the
worker whose core was lent. Prints medians, the lender's mean, and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "SPIN10k": {"GOMP_SPINCOUNT": "10000"},
}


def borrower(passes: int) -> dict[str, float]:
    os.sched_setaffinity(0, {0})
    import torch

    from worker.lending import TorchThreads

    torch.set_num_threads(1)
    threads = TorchThreads()
    results: dict[str, float] = {}
    for size in (384, 1024):
        a = torch.randn(size, size)
        kinds: dict[str, list[float]] = {"own": [], "lent": [], "after": []}
        for _ in range(passes):
            started = time.perf_counter()
            a @ a
            kinds["own"].append(time.perf_counter() - started)
            threads.apply(2, (0, 1))
            started = time.perf_counter()
            a @ a
            kinds["lent"].append(time.perf_counter() - started)
            threads.apply(1, (0,))
            started = time.perf_counter()
            a @ a
            kinds["after"].append(time.perf_counter() - started)
        for kind, times in kinds.items():
            results[f"{size}_{kind}_ms"] = statistics.median(times) * 1000
    return results


def lender(seconds: float) -> float:
    os.sched_setaffinity(0, {1})
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    times = []
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        time.sleep(0.004)
        started = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - started)
    return statistics.mean(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--role", default="")
    args = parser.parse_args()
    if args.role == "borrower":
        print(json.dumps(borrower(args.passes)))
        return
    if args.role.startswith("lender"):
        print(json.dumps({"lender_ms": lender(float(args.role.split(":")[1]))}))
        return
    me = [sys.executable, "-m", "bench.lendprobe", "--passes", str(args.passes)]
    for name, env in SETTINGS.items():
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        alone = subprocess.run(
            [*me, "--role", "lender:2"], env=environ, capture_output=True, text=True, check=True
        )
        lend = subprocess.Popen(
            [*me, "--role", "lender:4"], env=environ, stdout=subprocess.PIPE, text=True
        )
        borrowed = subprocess.run(
            [*me, "--role", "borrower"], env=environ, capture_output=True, text=True, check=True
        )
        out, _ = lend.communicate()
        row = json.loads(borrowed.stdout)
        lender_alone = json.loads(alone.stdout)["lender_ms"]
        lender_beside = json.loads(out)["lender_ms"]
        print(
            f"{name:8s} "
            + " ".join(f"{k}={v:.2f}" for k, v in row.items())
            + f" | lent/own 384: {row['384_own_ms'] / row['384_lent_ms']:.2f}x"
            + f" 1024: {row['1024_own_ms'] / row['1024_lent_ms']:.2f}x"
            + f" | lender pass alone {lender_alone:.3f} ms, beside lends {lender_beside:.3f} ms"
        )


if __name__ == "__main__":
    main()
