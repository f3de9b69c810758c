"""The OpenAI API's cost: /v1/embeddings against /predict, and streamed chat's pace.

    python -m bench.openai [--seconds 4] [--rounds 3] [--tokens 64]

1. One ``torchpool serve`` runs examples/text_embedding.py (a seeded 2-layer
   BERT, hidden 32, so the gateway's share of the work is as large as it gets
   and a per-request cost shows) with one worker. wrk posts the same sentence
   to ``/predict`` (``{"input_tensor": ...}``) and to ``/v1/embeddings``
   (``{"model", "input", "encoding_format": "float"}``) at 1, 8 and 32
   connections; the two arms alternate ``--rounds`` times, each round
   swapping which goes first, so whatever else the machine runs weighs on
   both alike. Reported: the median requests per second of each arm, the
   OpenAI route's cost against /predict, and the range of that cost over the
   rounds (the spread that any one round's figure carries).
2. Another serves examples/text_generation.py (a seeded 2-layer GPT-2, one
   character per token) with two workers; 1 and then 16 concurrent streams of
   ``/v1/chat/completions`` (``max_tokens`` ``--tokens``) are read as they
   come. Reported: time to first token (p50, p99, from sending the request),
   tokens per second per stream (from its first token to its last) and over
   all streams. A streaming worker runs one stream at a time, so with 16
   streams on two workers most of the time to first token is the queue.

3. The front alone: the gateway app in-process over the fake worker of
   tests/asgi.py (which answers at once), driven by plain ASGI calls, so its
   CPU time per request is the gateway's own work for each route (reading
   the body and finding the model included), free of the machine's load.

Writes ``bench/out/openai.md`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import HOST, OUT, ROOT
from bench.load import other_load, parse_wrk, tree_cpu_seconds, wrk
from bench.servers import Server, http, running

SENTENCE = "The quick brown dog ran in the park on the mat."
LEVELS = (1, 8, 32)
STREAMS = (1, 16)


def ready(workers: int) -> Callable[[Server], bool]:
    def check(server: Server) -> bool:
        try:
            status, body = http("GET", server.url + "/health", timeout=2)
        except OSError:
            return False
        return status == 200 and json.loads(body).get("ready_workers") == workers

    return check


def serve(key: str, args: list[str], workers: int) -> Server:
    argv = [sys.executable, "-m", "gateway", "--workers", str(workers), *args]
    argv += ["--host", HOST, "--port", "{port}"]  # bench.servers.start picks the port
    return Server(key, key, argv, {"HF_HUB_OFFLINE": "1"}, ready(workers))


def embeddings(folder: Path, seconds: float, rounds: int) -> list[str]:
    # The seeded test encoder (tests/test_examples.py builds it offline, no download).
    from tests.test_examples import build_text_model

    model_dir = build_text_model(folder / "bert")
    kwargs = json.dumps({"model_dir": str(model_dir)})
    args = ["--handler", "examples.text_embedding:TextEmbedder", "--model-kwargs", kwargs]
    args += ["--model-name", "embedder", "--max-batch-size", "32"]
    bodies = {
        "/predict": {"input_tensor": SENTENCE},
        "/v1/embeddings": {"model": "embedder", "input": SENTENCE, "encoding_format": "float"},
    }
    files = {}
    for path, body in bodies.items():
        files[path] = folder / (path.strip("/").replace("/", "-") + ".json")
        files[path].write_text(json.dumps(body))
    rates: dict[tuple[str, int], list[float]] = {}
    # CPU microseconds per request: the gateway process, and the whole tree (workers too).
    gateway_us: dict[tuple[str, int], list[float]] = {}
    tree_us: dict[tuple[str, int], list[float]] = {}
    with running(serve("embedder", args, 1), folder, "embedder") as server:
        for path in bodies:  # warm-up, and both answer
            wrk(4, 1, server.url + path, files[path])
        others = other_load(server, 2.0)
        for round_ in range(rounds):
            for level in LEVELS:
                # Each round swaps which arm goes first, so a drift within a round
                # (the batch sizer's probes, the machine's own) weighs on both alike.
                order = list(bodies) if round_ % 2 == 0 else list(reversed(bodies))
                for path in order:
                    total0, parent0 = tree_cpu_seconds(server)
                    result = parse_wrk(wrk(level, seconds, server.url + path, files[path]))
                    total1, parent1 = tree_cpu_seconds(server)
                    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result
                    count = max(result["requests"], 1.0)
                    rates.setdefault((path, level), []).append(result["requests_per_s"])
                    gateway_us.setdefault((path, level), []).append(
                        1e6 * (parent1 - parent0) / count
                    )
                    tree_us.setdefault((path, level), []).append(1e6 * (total1 - total0) / count)
    lines = [
        f"Other processes kept {others:.1f} of the machine's cores busy when it started.",
        "",
        "| c | /predict req/s | /v1 req/s | throughput cost | cost per round, min..max "
        "| gateway CPU µs/req (/predict, /v1) | server CPU µs/req (/predict, /v1) | CPU cost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in LEVELS:
        key_p, key_o = ("/predict", level), ("/v1/embeddings", level)
        predict, openai = statistics.median(rates[key_p]), statistics.median(rates[key_o])
        costs = [1 - o / p for p, o in zip(rates[key_p], rates[key_o], strict=True)]
        gate_p, gate_o = statistics.median(gateway_us[key_p]), statistics.median(gateway_us[key_o])
        all_p, all_o = statistics.median(tree_us[key_p]), statistics.median(tree_us[key_o])
        lines.append(
            f"| {level} | {predict:,.0f} | {openai:,.0f} | {100 * (1 - openai / predict):+.1f}% "
            f"| {100 * min(costs):+.1f}%..{100 * max(costs):+.1f}% "
            f"| {gate_p:,.0f}, {gate_o:,.0f} | {all_p:,.0f}, {all_o:,.0f} "
            f"| {100 * (all_o / all_p - 1):+.1f}% |"
        )
    lines.append("")
    rounds_shown = []
    for level in LEVELS:
        pairs = zip(rates[("/predict", level)], rates[("/v1/embeddings", level)], strict=True)
        rounds_shown.append(f"c={level}: " + ", ".join(f"{p:,.0f}/{o:,.0f}" for p, o in pairs))
    lines.append("Every round's req/s (/predict / /v1/embeddings): " + "; ".join(rounds_shown))
    return lines


async def one_stream(client: httpx.AsyncClient, tokens: int, seed: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds from the first token to the last, tokens)."""
    body = {
        "model": "gpt",
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
    }
    sent = time.perf_counter()
    first = last = 0.0
    count = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                last = time.perf_counter()
                first = first or last
                count += 1
    return first - sent, last - first, count


async def stream_level(
    url: str, tokens: int, concurrency: int
) -> tuple[list[float], list[float], float, int]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await one_stream(client, tokens, 0)  # warm-up
        started = time.perf_counter()
        samples = await asyncio.gather(*(one_stream(client, tokens, s) for s in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = sorted(s[0] for s in samples)
    rates = [(s[2] - 1) / s[1] for s in samples if s[1] > 0]
    return ttft, rates, wall, sum(s[2] for s in samples)


def chat(folder: Path, tokens: int) -> list[str]:
    args = ["--handler", "examples.text_generation:TextGenerator", "--model-name", "gpt"]
    args += ["--model-kwargs", json.dumps({"max_new_tokens": tokens, "n_positions": 256})]
    lines = [
        "| streams | TTFT p50 ms | TTFT p99 ms | tokens/s per stream (median) | tokens/s, all |",
        "|---:|---:|---:|---:|---:|",
    ]
    with running(serve("gpt", args, 2), folder, "gpt") as server:
        for concurrency in STREAMS:
            ttft, rates, wall, total = asyncio.run(stream_level(server.url, tokens, concurrency))
            p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
            lines.append(
                f"| {concurrency} | {1000 * statistics.median(ttft):.1f} | {1000 * p99:.1f} | "
                f"{statistics.median(rates):,.0f} | {total / wall:,.0f} |"
            )
    return lines


async def _front(requests: int) -> dict[str, float]:
    """CPU microseconds per request of the gateway app itself, per route."""
    from tests.asgi import reply, serving

    bodies = {
        "/predict": json.dumps({"input_tensor": SENTENCE}).encode(),
        "/v1/embeddings": json.dumps({"model": "demo", "input": SENTENCE}).encode(),
    }
    answer = json.dumps({"prediction": [[0.5] * 32]}).encode()
    costs: dict[str, list[float]] = {}
    async with serving() as served:
        signature = {"source": "handler", "outputs": None, "stream": False}
        served.ready(signature={**signature, "openai": ["embeddings"]}, capacity=64)
        served.answer = lambda sent: [reply(sent, answer, "json")]
        app = served.app
        for _ in range(5):  # alternate the routes, take the median
            for path, body in bodies.items():
                scope = {
                    "type": "http",
                    "method": "POST",
                    "path": path,
                    "headers": [(b"content-type", b"application/json")],
                }
                sent: list[dict[str, object]] = []

                async def receive(body: bytes = body) -> dict[str, object]:
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(message: dict[str, object], sent: list[Any] = sent) -> None:
                    sent.append(message)

                started = time.process_time()
                for _ in range(requests):
                    await app(scope, receive, send)  # type: ignore[arg-type]
                spent = time.process_time() - started
                statuses = {m["status"] for m in sent if m["type"] == "http.response.start"}
                assert statuses == {200}, statuses
                costs.setdefault(path, []).append(1e6 * spent / requests)
    return {path: statistics.median(values) for path, values in costs.items()}


def front(requests: int) -> list[str]:
    costs = asyncio.run(_front(requests))
    predict, openai = costs["/predict"], costs["/v1/embeddings"]
    return [
        "| route | gateway CPU µs per request |",
        "|---|---:|",
        f"| POST /predict | {predict:.1f} |",
        f"| POST /v1/embeddings | {openai:.1f} ({openai - predict:+.1f}) |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--front-requests", type=int, default=2000)
    parser.add_argument("--front-only", action="store_true", help="only part 3")
    args = parser.parse_args(argv)
    heading = [
        "## The front alone: the gateway in-process over a fake worker",
        "",
        *front(args.front_requests),
        "",
    ]
    if args.front_only:
        print("\n".join(heading))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-openai-") as temp:
        folder = Path(temp)
        report = [
            f"# OpenAI API bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
            "",
            f"`python -m bench.openai --seconds {args.seconds:g} --rounds {args.rounds} "
            f"--tokens {args.tokens}` from {ROOT.name}",
            "",
            "## /v1/embeddings against /predict, same embedder, one worker",
            "",
            *embeddings(folder, args.seconds, args.rounds),
            "",
            "## Streamed chat, two workers",
            "",
            *chat(folder, args.tokens),
            "",
            *heading,
        ]
    OUT.mkdir(parents=True, exist_ok=True)
    text = "\n".join(report)
    (OUT / "openai.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
