"""What a lend costs and gains under each OpenMP wait policy, on two cores.

    bench/.venv/bin/python -m bench.lendprobe [--passes 40] [--models]

For each setting (torch's default spinning wait, ``OMP_WAIT_POLICY=PASSIVE``,
``GOMP_SPINCOUNT=10000`` and ``100000``), and for each moment of pinning
(``before``: the process pinned to core 0 before torch loads, so GNU OpenMP
counts one core; ``after``: pinned once torch has loaded, as an elastic
worker is), a fresh process on core 0 with one thread runs matrix products
of two sizes (with ``--models`` also ResNet-18 on a 224x224 image and a
MiniLM-shaped text encoder on one sentence, both seeded), alternating three
kinds of pass:

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
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SETTINGS = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "SPIN10k": {"GOMP_SPINCOUNT": "10000"},
    "SPIN100k": {"GOMP_SPINCOUNT": "100000"},
}
PINS = ("before", "after")


def workloads(models: bool) -> dict[str, Callable[[], object]]:
    """Name -> one pass, built after torch is imported."""
    import torch

    passes: dict[str, Callable[[], object]] = {}
    for size in (384, 1024):
        passes[str(size)] = functools.partial(torch.mm, *[torch.randn(size, size)] * 2)
    if models:
        from examples import demo_models
        from examples.resnet import ResNet18
        from examples.text_embedding import TextEmbedder

        resnet = ResNet18().eval()
        image = torch.randn(1, 3, 224, 224)
        passes["resnet18"] = lambda: resnet(image)
        folder = Path(tempfile.mkdtemp(prefix="lendprobe-"))
        text = TextEmbedder(model_dir=str(demo_models.save_text_model(folder / "minilm")))
        text.load(torch.device("cpu"))
        sentence = text.preprocess("The quick brown fox jumps over the lazy dog.", "text/plain")
        passes["text"] = lambda: text.predict(sentence)
    return passes


def borrower(passes: int, pin: str, models: bool) -> dict[str, float]:
    if pin == "before":
        os.sched_setaffinity(0, {0})
    import torch

    from worker.lending import TorchThreads
    from worker.pinning import pin_every_thread

    if pin == "after":
        pin_every_thread((0,))
    torch.set_num_threads(1)
    threads = TorchThreads()
    results: dict[str, float] = {}
    with torch.inference_mode():
        for name, run in workloads(models).items():
            kinds: dict[str, list[float]] = {"own": [], "lent": [], "after": []}
            for _ in range(passes):
                started = time.perf_counter()
                run()
                kinds["own"].append(time.perf_counter() - started)
                threads.apply(2, (0, 1))
                started = time.perf_counter()
                run()
                kinds["lent"].append(time.perf_counter() - started)
                threads.apply(1, (0,))
                started = time.perf_counter()
                run()
                kinds["after"].append(time.perf_counter() - started)
            for kind, times in kinds.items():
                results[f"{name}_{kind}_ms"] = statistics.median(times) * 1000
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
    parser.add_argument("--models", action="store_true", help="ResNet-18 and a text encoder too")
    parser.add_argument("--role", default="")
    args = parser.parse_args()
    if args.role.startswith("borrower"):
        print(json.dumps(borrower(args.passes, args.role.split(":")[1], args.models)))
        return
    if args.role.startswith("lender"):
        print(json.dumps({"lender_ms": lender(float(args.role.split(":")[1]))}))
        return
    me = [sys.executable, "-m", "bench.lendprobe", "--passes", str(args.passes)]
    me += ["--models"] if args.models else []
    print("speed-up of a lent pass (own / lent median), and the lender's small pass")
    for pin in PINS:
        for name, env in SETTINGS.items():
            environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
            alone = subprocess.run(
                [*me, "--role", "lender:2"], env=environ, capture_output=True, text=True, check=True
            )
            seconds = 8 if args.models else 4
            lend = subprocess.Popen(
                [*me, "--role", f"lender:{seconds}"], env=environ, stdout=subprocess.PIPE, text=True
            )
            borrowed = subprocess.run(
                [*me, "--role", f"borrower:{pin}"],
                env=environ,
                capture_output=True,
                text=True,
                check=True,
            )
            out, _ = lend.communicate()
            row = json.loads(borrowed.stdout)
            gains = {
                key[: -len("_own_ms")]: row[key] / row[key.replace("_own_", "_lent_")]
                for key in row
                if key.endswith("_own_ms")
            }
            lender_alone = json.loads(alone.stdout)["lender_ms"]
            lender_beside = json.loads(out)["lender_ms"]
            print(
                f"pinned {pin:6s} {name:8s} "
                + " ".join(f"{k} {v:.2f}x" for k, v in gains.items())
                + f" | lender alone {lender_alone:.3f} ms, beside lends {lender_beside:.3f} ms"
            )


if __name__ == "__main__":
    main()
