"""Real model kinds: torchpool's worked examples against the one-process FastAPI recipe.

    bench/run.sh realmodels [--duration 8] [--concurrency 1,2,8,32] [--models text,image]
                            [--servers recipe,recipe2,on,off] [--rounds 2]

Two models, each served two ways on this machine:

- text: a BERT-style encoder of MiniLM-L6's shape (6 layers, hidden 384, 12 heads,
  30522 tokens) built from a config with seeded weights, one sentence per request
  (``{"input_tensor": "..."}``, 64 made-up sentences of 6-18 words in turn);
- image: a ResNet-18 (1000 classes), one 640x480 JPEG per request as the raw body
  (``content-type: image/jpeg``), resized and centre-cropped to 224.

Servers: the recipe (``bench/peers/realrecipe.py``: FastAPI + uvicorn, one process,
torch's default threads, the model run inline), the same app under
``uvicorn --workers 2``, and torchpool with the ``examples/`` handlers (two
workers of one core each, batching on) with elastic cores on and off
(``--no-elastic-cores``). The two torchpool arms are an A/B of one build: they
run ``--rounds`` times each, alternated (on, off, then off, on, ...), so other
load on the machine hits both alike; the tables show the median run of each and
the spread (lowest to highest req/s) across rounds. Beside the results, the
machine's ceiling for each model: the usable cores divided by one request's
decode plus forward on one thread, run alone in-process. Every server's
answer is checked against the handler run in-process before it is measured. Then
wrk at each concurrency: a warm-up, one measured run. Writes
``bench/RESULTS-realmodels.md`` and raw JSON under ``bench/out/realmodels/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.bench import _raise_on_term, machine_info
from bench.common import BENCH, HOST, OUT, ROOT, TOLERANCE, VENV_BIN, Ceiling, Results, Run
from bench.load import (
    QuietGate,
    busy_cpu_seconds,
    own_cpu_seconds,
    parse_wrk,
    tree_cpu_seconds,
    wrk,
    wrk_argv,
)
from bench.servers import (
    Server,
    ServerFailed,
    memory,
    ready_torchpool,
    ready_uvicorn,
    running,
)
from examples import demo_models
from examples.image_classifier import ImageClassifier
from examples.text_embedding import TextEmbedder

LUA = BENCH / "post_bodies.lua"
RECIPE = "recipe (1 uvicorn process, torch default threads)"
RECIPE2 = "recipe (uvicorn --workers 2, torch default threads)"
TP = "torchpool (2 workers, batch 16, 2 ms, elastic cores)"
TP_OFF = "torchpool (2 workers, batch 16, 2 ms, --no-elastic-cores)"
SERVER_LABELS = {"recipe": RECIPE, "recipe2": RECIPE2, "on": TP, "off": TP_OFF}
MODELS = ("text", "image")
# Issue #20's targets (see target_lines).
P50_OVER_RECIPE = 1.05  # c=1 p50 at most this many times the recipe's
TEXT_C8_OVER_RECIPE = 2.5
IMAGE_OF_CEILING = 0.85
DESCRIPTION = {
    "text": "BERT-style encoder, 6 layers, hidden 384 (MiniLM-L6 shape); one sentence",
    "image": "ResNet-18, 1000 classes, 224x224; one 640x480 JPEG (raw body)",
}
CONTENT_TYPE = {"text": "application/json", "image": "image/jpeg"}


class Workload:
    """One model's files, request bodies and in-process reference answer."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "text":
            self.model = demo_models.save_text_model(folder / "minilm-shaped")
            self.kwargs: dict[str, Any] = {"model_dir": str(self.model)}
            self.env = {"BENCH_TEXT_DIR": str(self.model)}
            bodies = [json.dumps({"input_tensor": s}) for s in demo_models.sentences(64)]
            self.body_file = folder / "bodies.jsonl"
            self.body_file.write_text("\n".join(bodies) + "\n")
            self.body = bodies[0].encode()
            self.handler: TextEmbedder | ImageClassifier = TextEmbedder(**self.kwargs)
            self.handler_path = "examples.text_embedding:TextEmbedder"
        else:
            self.model = demo_models.save_image_model(folder / "resnet18.pt")
            self.kwargs = {"weights": str(self.model)}
            self.env = {"BENCH_IMAGE_WEIGHTS": str(self.model)}
            self.body_file = folder / "cat.jpg"
            self.body_file.write_bytes(demo_models.photo(640, 480))
            self.body = self.body_file.read_bytes()
            self.handler = ImageClassifier(**self.kwargs)
            self.handler_path = "examples.image_classifier:ImageClassifier"
        self.handler.load(torch.device("cpu"))
        self.expected = self.answer(self.body)

    def answer(self, body: bytes) -> Any:
        """What the handler answers in-process for ``body`` (as the JSON would carry it)."""
        handler = self.handler
        with torch.inference_mode():
            if isinstance(handler, TextEmbedder):
                text = json.loads(body)["input_tensor"]
                return handler.predict(handler.preprocess(text, "application/json")).tolist()
            return handler.postprocess(handler.predict(handler.preprocess(body, "image/jpeg")))

    def wrk_env(self) -> dict[str, str]:
        lines = "1" if self.name == "text" else "0"
        return {"BENCH_CONTENT_TYPE": CONTENT_TYPE[self.name], "BENCH_LINES": lines}

    def ceilings(self, batches: Sequence[int] = (1, 8), seconds: float = 1.0) -> list[Ceiling]:
        """The handler's predict alone, on one thread (a torchpool worker's share)."""
        handler = self.handler
        predict: Callable[[Any], Any] = handler.predict
        out = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for batch in batches:
                x: Any
                if isinstance(handler, TextEmbedder):
                    sentence = json.loads(self.body)["input_tensor"]
                    x = handler.preprocess([sentence] * batch, "application/json")
                else:
                    x = torch.cat([handler.preprocess(self.body, "image/jpeg")] * batch)
                with torch.inference_mode():
                    predict(x)
                    count, start = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - start) < seconds:
                        predict(x)
                        count += 1
                rows_per_s, ms = count * batch / elapsed, elapsed * 1000 / count
                out.append(Ceiling(self.name, batch, rows_per_s, ms))
        finally:
            torch.set_num_threads(threads)
        return out

    def machine_ceiling(self, seconds: float = 2.0) -> Ceiling:
        """The usable cores over one request's decode plus forward on one thread, in-process."""
        handler = self.handler
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            count, start = 0, time.perf_counter()
            with torch.inference_mode():
                while (elapsed := time.perf_counter() - start) < seconds:
                    if isinstance(handler, TextEmbedder):
                        text = json.loads(self.body)["input_tensor"]
                        handler.predict(handler.preprocess(text, "application/json"))
                    else:
                        handler.predict(handler.preprocess(self.body, "image/jpeg"))
                    count += 1
        finally:
            torch.set_num_threads(threads)
        one_ms = elapsed * 1000 / count
        cores = len(os.sched_getaffinity(0))
        return Ceiling(self.name, 0, cores * 1000 / one_ms, one_ms)


def servers(work: Workload, keys: Sequence[str] = ("recipe", "on")) -> list[Server]:
    python = str(VENV_BIN / "python")
    app = f"bench.peers.realrecipe:{work.name}_app"
    offline = {"HF_HUB_OFFLINE": "1"}
    recipe = Server(
        "recipe",
        RECIPE,
        [python, "-m", "uvicorn", app, "--host", HOST, "--no-access-log", "--port", "{port}"],
        {**work.env, **offline},
        ready_uvicorn(1),
    )
    recipe2 = Server(
        "recipe2",
        RECIPE2,
        [python, "-m", "uvicorn", app, "--host", HOST, "--no-access-log", "--workers", "2",
         "--port", "{port}"],
        {**work.env, **offline},
        ready_uvicorn(2),
    )  # fmt: skip
    torchpool = [
        str(VENV_BIN / "torchpool"), "serve", "--workers", "2",
        "--handler", work.handler_path, "--model-kwargs", json.dumps(work.kwargs),
        "--max-batch-size", "16", "--max-batch-delay-ms", "2",
        "--host", HOST, "--log-level", "warning", "--port", "{port}",
    ]  # fmt: skip
    on = Server("tp", TP, torchpool, offline, ready_torchpool)
    off = Server("tpoff", TP_OFF, [*torchpool, "--no-elastic-cores"], offline, ready_torchpool)
    chosen = {"recipe": recipe, "recipe2": recipe2, "on": on, "off": off}
    return [chosen[key] for key in keys]


def schedule(keys: Sequence[str], rounds: int) -> list[str]:
    """The order servers run in: the recipes once, the torchpool arms alternated.

    Round r runs ``on, off`` when r is even and ``off, on`` when odd.
    """
    recipes = [key for key in keys if key not in ("on", "off")]
    arms = [key for key in ("on", "off") if key in keys]
    order = list(recipes)
    for round_ in range(rounds):
        order += arms if round_ % 2 == 0 else arms[::-1]
    return order


def check(server: Server, work: Workload) -> None:
    """One answer from ``server`` must match the handler run in-process."""
    request_headers = {"Content-Type": CONTENT_TYPE[work.name]}
    status, answer = post(server.url + "/predict", work.body, request_headers)
    if status != 200:
        raise ServerFailed(f"{server.label}: POST /predict answered {status}: {answer[:500]!r}")
    got = json.loads(answer)["prediction"]
    if not close(got, work.expected):
        raise ServerFailed(
            f"{server.label} answered differently from the handler run in-process:\n"
            f"  got  {str(got)[:400]}\n  want {str(work.expected)[:400]}"
        )


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def close(got: Any, want: Any) -> bool:
    """Same structure; numbers within TOLERANCE; strings equal."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(close(got[key], want[key]) for key in want)
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(close(a, b) for a, b in zip(got, want, strict=True))
        )
    if isinstance(want, float | int) and not isinstance(want, bool):
        return isinstance(got, float | int) and abs(got - want) <= TOLERANCE
    return bool(got == want)


def settle(server: Server, timeout_s: float = 60.0) -> None:
    """Wait until ``server`` is idle: done with the requests an earlier wrk run left.

    When wrk stops it abandons up to ``c`` requests; a server computing inline (the
    recipe) still runs them all, and they would eat into the next measured run.
    """
    deadline = time.monotonic() + timeout_s
    before, start = tree_cpu_seconds(server)[0], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)  # the sampling interval of a CPU reading
        after, now = tree_cpu_seconds(server)[0], time.monotonic()
        if (after - before) / (now - start) < 0.1:
            return
        before, start = after, now


def measure(
    server: Server,
    work: Workload,
    concurrencies: Sequence[int],
    args: argparse.Namespace,
    gate: QuietGate,
    results: Results,
) -> None:
    out: Path = args.out
    with running(server, out / "logs", work.name):
        check(server, work)
        url = server.url + "/predict"
        env = work.wrk_env()
        for concurrency in concurrencies:
            settle(server)
            gate.wait(server)
            wrk(concurrency, args.warmup, url, work.body_file, LUA, env)
            settle(server)
            busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            tree0, parent0 = tree_cpu_seconds(server)
            output = wrk(concurrency, args.duration, url, work.body_file, LUA, env)
            tree1, parent1 = tree_cpu_seconds(server)
            busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(server), time.monotonic()
            other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
            (out / f"wrk-{work.name}-{server.key}-c{concurrency}.txt").write_text(output)
            parsed = parse_wrk(output)
            requests = max(1.0, parsed["requests"])
            run = Run(
                work.name,
                server.label,
                concurrency,
                parsed["requests_per_s"],
                parsed["p50_ms"],
                parsed["p99_ms"],
                int(parsed["requests"]),
                int(parsed["non_2xx"]),
                int(parsed["socket_errors"]),
                round(other, 2),
                1000 * (tree1 - tree0) / requests,
                1000 * (parent1 - parent0) / requests,
                output,
            )
            results.runs.append(run)
            print(
                f"   c={concurrency:<3} {run.requests_per_s:8.1f} req/s  p50 {run.p50_ms:8.2f} ms"
                f"  p99 {run.p99_ms:8.2f} ms  errors {run.errors}  other load "
                f"{run.other_load:.2f} cores",
                flush=True,
            )
        results.memory.append(memory(server, work.name))


def runs_of(results: Results, model: str, label: str, concurrency: int) -> list[Run]:
    return [
        run
        for run in results.runs
        if (run.model, run.server, run.concurrency) == (model, label, concurrency)
    ]


def median_run(results: Results, model: str, label: str, concurrency: int) -> Run | None:
    """The run with the median req/s (the lower one of two) of that server and level."""
    runs = sorted(runs_of(results, model, label, concurrency), key=lambda r: r.requests_per_s)
    return runs[(len(runs) - 1) // 2] if runs else None


def spread(results: Results, model: str, concurrency: int) -> float:
    """The widest range of req/s across rounds of either torchpool arm (0 with one round)."""
    widest = 0.0
    for label in (TP, TP_OFF):
        rates = [r.requests_per_s for r in runs_of(results, model, label, concurrency)]
        if len(rates) > 1:
            widest = max(widest, max(rates) - min(rates))
    return widest


def ceiling_of(results: Results, model: str) -> Ceiling | None:
    return next((c for c in results.ceilings if c.model == model and c.batch == 0), None)


def target_lines(results: Results, concurrencies: Sequence[int]) -> list[str]:
    """PASS/FAIL per target line of issue #20, misses included; medians of the rounds."""
    lines: list[str] = []

    def verdict(passed: bool, title: str, detail: str) -> None:
        lines.append(f"{'PASS' if passed else 'FAIL'}  {title}: {detail}")

    def missing(title: str) -> None:
        lines.append(f"FAIL  {title}: no data (a run is missing)")

    for name in MODELS:
        title = f"{name} c=1: torchpool p50 <= {P50_OVER_RECIPE:g}x the recipe's"
        tp, recipe = median_run(results, name, TP, 1), median_run(results, name, RECIPE, 1)
        if tp is None or recipe is None:
            missing(title)
        else:
            ratio = tp.p50_ms / recipe.p50_ms if recipe.p50_ms else float("inf")
            detail = f"{tp.p50_ms:.2f} vs {recipe.p50_ms:.2f} ms ({ratio:.2f}x)"
            verdict(ratio <= P50_OVER_RECIPE and tp.errors == 0, title, detail)
    title = f"text c=8: torchpool req/s >= {TEXT_C8_OVER_RECIPE:g}x the recipe"
    tp, recipe = median_run(results, "text", TP, 8), median_run(results, "text", RECIPE, 8)
    if tp is None or recipe is None:
        missing(title)
    else:
        ratio = tp.requests_per_s / recipe.requests_per_s if recipe.requests_per_s else 0.0
        detail = f"{tp.requests_per_s:.1f} vs {recipe.requests_per_s:.1f} ({ratio:.2f}x)"
        verdict(ratio >= TEXT_C8_OVER_RECIPE and tp.errors == 0, title, detail)
    ceiling = ceiling_of(results, "image")
    for level in (8, 32):
        title = f"image c={level}: torchpool req/s >= {IMAGE_OF_CEILING:g}x the machine's ceiling"
        tp = median_run(results, "image", TP, level)
        if tp is None or ceiling is None:
            missing(title)
        else:
            ratio = tp.requests_per_s / ceiling.rows_per_s
            detail = f"{tp.requests_per_s:.1f} vs ceiling {ceiling.rows_per_s:.1f} ({ratio:.2f}x)"
            verdict(ratio >= IMAGE_OF_CEILING and tp.errors == 0, title, detail)
    title = "image c=32 >= c=8 (torchpool)"
    low, high = median_run(results, "image", TP, 8), median_run(results, "image", TP, 32)
    if low is None or high is None:
        missing(title)
    else:
        detail = f"{high.requests_per_s:.1f} vs {low.requests_per_s:.1f} req/s"
        verdict(high.requests_per_s >= low.requests_per_s, title, detail)
    for name in MODELS:
        for level in concurrencies:
            title = f"{name} c={level}: elastic cores on no slower than off (within the spread)"
            on, off = median_run(results, name, TP, level), median_run(results, name, TP_OFF, level)
            if on is None or off is None:
                missing(title)
                continue
            margin = spread(results, name, level)
            detail = (
                f"{on.requests_per_s:.1f} vs {off.requests_per_s:.1f} req/s "
                f"(spread {margin:.1f}); p50 {on.p50_ms:.2f} vs {off.p50_ms:.2f} ms"
            )
            verdict(on.requests_per_s >= off.requests_per_s - margin, title, detail)
    return lines


def report(results: Results, concurrencies: Sequence[int], commands: dict[str, str]) -> str:
    lines = [
        "# torchpool on real model kinds: results",
        "",
        f"Run of {results.started} (UTC), {results.seconds / 60:.1f} minutes, written by "
        "`bench/run.sh realmodels` (`bench/realmodels.py`). Raw numbers and every wrk "
        "output and server log: `bench/out/realmodels/`.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in results.machine.items()],
        "",
        "wrk (one thread) shares the cores with the servers.",
        "",
        "## Commands",
        "",
        *[f"- {label}: `{command}`" for label, command in commands.items()],
        "",
        "Each server x concurrency: a warm-up, then the measured run. Before measuring, "
        "one answer is checked against the `examples/` handler run in-process (abs tol "
        f"{TOLERANCE:g}).",
        "",
        *[f"- {note}" for note in results.notes],
    ]
    for name in MODELS:
        lines += [
            "",
            f"## {name}: {DESCRIPTION[name]}",
            "",
            "| server | c | req/s (median) | lowest-highest | p50 ms | p99 ms | errors "
            "| tp req/s ratio | CPU ms/req (parent) | other load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for concurrency in concurrencies:
            tp = median_run(results, name, TP, concurrency)
            for label in (RECIPE, RECIPE2, TP, TP_OFF):
                run = median_run(results, name, label, concurrency)
                if run is None:
                    continue
                rates = [r.requests_per_s for r in runs_of(results, name, label, concurrency)]
                ratio = ""
                if tp is not None and label != TP and run.requests_per_s:
                    ratio = f"{tp.requests_per_s / run.requests_per_s:.2f}x"
                lines.append(
                    f"| {label} | {concurrency} | {run.requests_per_s:,.1f} "
                    f"| {min(rates):,.1f}-{max(rates):,.1f} ({len(rates)}) | {run.p50_ms:.2f} "
                    f"| {run.p99_ms:.2f} | {run.errors} | {ratio} | "
                    f"{run.cpu_ms_per_request:.2f} ({run.parent_cpu_ms_per_request:.2f}) "
                    f"| {run.other_load:.2f} |"
                )
        ceiling = ceiling_of(results, name)
        if ceiling is not None:
            lines += [
                "",
                f"Machine ceiling: {ceiling.rows_per_s:.1f} req/s (usable cores / "
                f"{ceiling.ms_per_forward:.1f} ms for one decode + forward on one thread, "
                "in-process).",
            ]
    lines += [
        "",
        "## Memory (whole process tree, after the server's runs)",
        "",
        "| model | server | processes | total RSS MB | total PSS MB | parent RSS MB |",
        "|---|---|---:|---:|---:|---:|",
        *[
            f"| {m.model} | {m.server} | {m.processes} | {m.rss_mb:.0f} | {m.pss_mb:.0f} "
            f"| {m.parent_rss_mb:.1f} |"
            for m in results.memory
        ],
        "",
        "## The model alone (handler's predict, one thread, no HTTP)",
        "",
        "| model | batch | ms per forward | rows/s |",
        "|---|---:|---:|---:|",
        *[
            f"| {c.model} | {c.batch} | {c.ms_per_forward:.1f} | {c.rows_per_s:,.1f} |"
            for c in results.ceilings
            if c.batch
        ],
        "",
        "## Targets",
        "",
        "```",
        *target_lines(results, concurrencies),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", default="1,2,8,32")
    parser.add_argument(
        "--servers", default="recipe,recipe2,on,off", help=f"of {','.join(SERVER_LABELS)}"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each torchpool arm")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quiet-limit", type=float, default=0.25)
    parser.add_argument("--quiet-budget", type=float, default=120.0)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS-realmodels.md")
    parser.add_argument("--out", type=Path, default=OUT / "realmodels")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    # The recipe runs with torch's default threads: no thread limit may leak into it.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.pop(name, None)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = [name for name in args.models.split(",") if name]
    began = time.monotonic()
    per_run = args.warmup + args.duration + 1.5
    order = schedule([key for key in args.servers.split(",") if key], args.rounds)
    estimate = len(names) * len(order) * (len(concurrencies) * per_run + 20) + 40 * len(names)
    print(f"estimated time: {estimate / 60:.1f} minutes on a quiet machine", flush=True)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    gate = QuietGate(args.quiet_limit, args.quiet_budget, per_run_s=20.0)
    results = Results(
        started=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(),
    )
    described = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    results.machine["torchpool source"] = f"git {described.stdout.strip() or '?'} at {ROOT}"
    results.notes.append(
        "torchpool serves the `examples/` handlers with 2 workers, each pinned to one core "
        "with one torch thread; the recipe is one uvicorn process with torch's default "
        f"thread count ({torch.get_num_threads()} here) running the model inline."
    )
    results.notes.append(
        "text bodies: 64 different one-sentence JSON bodies sent in turn by "
        "`bench/post_bodies.lua`; image: the same 640x480 JPEG (about "
        "60 kB) every time, raw, `content-type: image/jpeg`."
    )
    results.notes += args.note
    commands: dict[str, str] = {}
    for name in names:
        print(f"== preparing {name}", flush=True)
        work = Workload(name, out / name)
        results.ceilings += [*work.ceilings(), work.machine_ceiling()]
        for server in servers(work, order):
            command = shlex.join(server.argv).replace(str(out), "OUT")
            command = command.replace(str(ROOT) + "/", "").replace("'{port}'", "PORT")
            commands[f"{name} / {server.label}"] = command
            print(f"== {name} / {server.label}", flush=True)
            try:
                measure(server, work, concurrencies, args, gate, results)
            except ServerFailed as exc:
                print(f"   FAILED: {exc}", flush=True)
                results.notes.append(
                    f"{name} / {server.label} could not be measured: "
                    + str(exc).splitlines()[0]
                    + f" (log: {out / 'logs' / f'{name}-{server.key}.log'})"
                )
            results.seconds = time.monotonic() - began
            (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    commands["wrk"] = (
        shlex.join(wrk_argv(8, args.duration, "http://127.0.0.1:PORT/predict", LUA)).replace(
            str(ROOT) + "/", ""
        )
        + f"  (c = {args.concurrency}; BENCH_BODY, BENCH_CONTENT_TYPE, BENCH_LINES per model)"
    )
    results.seconds = time.monotonic() - began
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    args.results.write_text(report(results, concurrencies, commands))
    print("\n".join(target_lines(results, concurrencies)), flush=True)
    print(f"took {results.seconds / 60:.1f} minutes; wrote {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
