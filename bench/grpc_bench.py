"""gRPC against REST on one torchpool: throughput, latency and the gateway's CPU per request.

    python -m bench.grpc_bench [--duration 3] [--rounds 2] [--concurrency 1,8,64]
                               [--models small,heavy,text] [--out bench/RESULTS-grpc.md]

Three arms against the same server and model, in the same run: gRPC
``ModelInfer`` with raw tensors (tritonclient's default), REST ``/v2/.../infer``
with the binary tensor extension, and REST with JSON tensors. Every arm's
answer is checked against the JSON arm's before anything is measured. The arms
alternate within each round, and rounds repeat, so a busy machine hits them
alike. The load comes from this process: asyncio with pre-built requests, raw
HTTP/1.1 keep-alive connections for REST and grpc.aio channels (one per eight
calls in flight) for gRPC, so that neither client parses what it gets back.

Memory, after load: the gateway's RSS with gRPC on and off, and the PSS of the
whole process tree, against ``uvicorn --workers 2`` running the recipe app
(bench/peers) on the same model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2

from bench import models
from bench.common import HOST
from bench.servers import Server, free_port, memory, ready_torchpool, ready_uvicorn, running

METHOD = "/inference.GRPCInferenceService/ModelInfer"
PYTHON = sys.executable
ARMS = ("grpc", "rest-binary", "rest-json")


@dataclass
class Workload:
    """A model as torchpool serves it, and one request in each arm's form."""

    name: str
    serve_args: list[str]
    recipe: tuple[str, dict[str, str]] | None  # uvicorn app and env, for the memory comparison
    datatype: str
    shape: list[int]
    raw: bytes  # the input tensor's bytes (BYTES: length-prefixed)
    json_data: list[Any]


def workloads(folder: Path, names: Sequence[str]) -> list[Workload]:
    chosen = []
    for name in names:
        if name in models.MODELS:
            weights = models.save(name, folder)
            cls = models.MODELS[name]
            row = np.array(models.example_row(name), dtype=np.float32)
            args = [
                "--model",
                str(weights),
                "--model-class",
                f"bench.models:{cls.__name__}",
                "--input-shape",
                str(cls.inputs),
            ]
            env = {"BENCH_MODEL": name, "BENCH_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1"}
            chosen.append(
                Workload(
                    name,
                    args,
                    ("bench.peers.recipe:app", env),
                    "FP32",
                    list(row.shape),
                    row.tobytes(),
                    row.ravel().tolist(),
                )
            )
        elif name == "text":
            from examples import demo_models

            model_dir = demo_models.save_text_model(folder / "minilm-shaped")
            args = [
                "--handler",
                "examples.text_embedding:TextEmbedder",
                "--model-kwargs",
                json.dumps({"model_dir": str(model_dir)}),
            ]
            sentence = "The quick brown fox jumps over the lazy dog near the river bank."
            raw = struct.pack("<I", len(sentence)) + sentence.encode()
            env = {"BENCH_TEXT_DIR": str(model_dir), "HF_HUB_OFFLINE": "1"}
            recipe = ("bench.peers.realrecipe:text_app", env)
            chosen.append(Workload(name, args, recipe, "BYTES", [1], raw, [sentence]))
    return chosen


# --- the three arms' requests ------------------------------------------------------------


def grpc_request(work: Workload) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=work.name)
    request.inputs.add(name="input__0", datatype=work.datatype, shape=work.shape)
    request.raw_input_contents.append(work.raw)
    return bytes(request.SerializeToString())


def rest_request(work: Workload, port: int, binary: bool) -> bytes:
    tensor: dict[str, Any] = {"name": "input__0", "shape": work.shape, "datatype": work.datatype}
    headers = [f"POST /v2/models/{work.name}/infer HTTP/1.1", f"Host: {HOST}:{port}"]
    if binary:
        tensor["parameters"] = {"binary_data_size": len(work.raw)}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        body = head.encode() + work.raw
        headers += [
            "Content-Type: application/octet-stream",
            f"Inference-Header-Content-Length: {len(head.encode())}",
        ]
    else:
        tensor["data"] = work.json_data
        body = json.dumps({"inputs": [tensor]}).encode()
        headers.append("Content-Type: application/json")
    headers.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def passthrough(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """ModelInfer taking and giving serialized messages (``bytes(b)`` is ``b`` itself)."""
    return channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)


async def rest_call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


# --- one measured run -------------------------------------------------------------------


@dataclass
class Measure:
    model: str
    arm: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    gateway_cpu_ms: float  # the gateway process's own CPU per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def drive(
    call_factory: Callable[[], Awaitable[Callable[[], Awaitable[Any]]]],
    concurrency: int,
    seconds: float,
) -> tuple[list[float], int]:
    """``concurrency`` loops, each with its own call (made by ``call_factory``), for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal errors
        call = await call_factory()
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, errors


async def run_arm(
    arm: str,
    work: Workload,
    port: int,
    grpc_port: int,
    concurrency: int,
    seconds: float,
    gateway: psutil.Process,
) -> Measure:
    closers: list[Callable[[], Awaitable[None]]] = []
    channels: list[grpc.aio.Channel] = []
    if arm == "grpc":
        payload = grpc_request(work)
        for _ in range(max(1, concurrency // 8)):
            channels.append(grpc.aio.insecure_channel(f"{HOST}:{grpc_port}"))
        counter = iter(range(1 << 30))

        async def grpc_factory() -> Callable[[], Awaitable[Any]]:
            channel = channels[next(counter) % len(channels)]
            method = passthrough(channel)
            return lambda: method(payload)

        factory: Callable[[], Awaitable[Callable[[], Awaitable[Any]]]] = grpc_factory
    else:
        request = rest_request(work, port, binary=arm == "rest-binary")

        async def rest_factory() -> Callable[[], Awaitable[Any]]:
            reader, writer = await asyncio.open_connection(HOST, port)

            async def close() -> None:
                writer.close()

            closers.append(close)
            return lambda: rest_call(reader, writer, request)

        factory = rest_factory
    before = gateway.cpu_times()
    started = time.perf_counter()
    latencies, errors = await drive(factory, concurrency, seconds)
    elapsed = time.perf_counter() - started
    after = gateway.cpu_times()
    for close in closers:
        await close()
    for channel in channels:
        await channel.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    latencies.sort()
    n = len(latencies)
    return Measure(
        work.name,
        arm,
        concurrency,
        n,
        errors,
        elapsed,
        1000 * latencies[n // 2] if n else 0.0,
        1000 * latencies[min(n - 1, int(n * 0.99))] if n else 0.0,
        1000 * cpu / n if n else 0.0,
    )


def check_same_answers(work: Workload, port: int, grpc_port: int) -> None:
    """Every arm answers the same numbers as REST JSON, before anything is measured."""

    async def answers() -> dict[str, np.ndarray[Any, Any]]:
        reader, writer = await asyncio.open_connection(HOST, port)
        got: dict[str, np.ndarray[Any, Any]] = {}
        plain = json.loads(await rest_call(reader, writer, rest_request(work, port, False)))
        got["rest-json"] = np.array(plain["outputs"][0]["data"], dtype=np.float32)
        body = await rest_call(reader, writer, rest_request(work, port, True))
        header = json.loads(body[: body.index(b"}]}") + 3])
        size = header["outputs"][0]["parameters"]["binary_data_size"]
        got["rest-binary"] = np.frombuffer(body[len(body) - size :], dtype=np.float32)
        writer.close()
        async with grpc.aio.insecure_channel(f"{HOST}:{grpc_port}") as channel:
            raw = await passthrough(channel)(grpc_request(work))
        response = service_pb2.ModelInferResponse.FromString(raw)
        got["grpc"] = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        return got

    got = asyncio.run(answers())
    for arm in ARMS:
        if not np.allclose(got[arm], got["rest-json"], atol=1e-5):
            raise SystemExit(
                f"{work.name}: {arm} answers {got[arm][:4]}, JSON {got['rest-json'][:4]}"
            )


# --- servers ------------------------------------------------------------------------------


def torchpool(work: Workload, grpc_port: int | None) -> Server:
    """torchpool as bench/bench.py runs it (two workers, batching), gRPC on ``grpc_port``."""
    argv = [
        PYTHON,
        "-m",
        "gateway",
        "--workers",
        "2",
        *work.serve_args,
        "--model-name",
        work.name,
        "--max-batch-size",
        "16",
        "--max-batch-delay-ms",
        "2",
        "--host",
        HOST,
        "--log-level",
        "warning",
        "--port",
        "{port}",
    ]
    if grpc_port is not None:
        argv += ["--grpc-port", str(grpc_port)]
    key = "tp" if grpc_port is None else "tp-grpc"
    return Server(key, "torchpool", argv, {"HF_HUB_OFFLINE": "1"}, ready_torchpool)


def recipe(work: Workload) -> Server | None:
    if work.recipe is None:
        return None
    app, env = work.recipe
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        app,
        "--host",
        HOST,
        "--workers",
        "2",
        "--no-access-log",
        "--port",
        "{port}",
    ]
    return Server("recipe2", "uvicorn --workers 2", argv, env, ready_uvicorn(2))


def warm_memory(server: Server, work: Workload, seconds: float, path: str) -> dict[str, float]:
    """The server's memory after ``seconds`` of REST JSON load at c=8 on ``path``."""
    tensor = {
        "name": "input__0",
        "shape": work.shape,
        "datatype": work.datatype,
        "data": work.json_data,
    }
    body = json.dumps(
        {"inputs": [tensor]}
        if path.endswith("/infer")
        else {"input_tensor": work.json_data if work.name == "text" else [work.json_data]}
    ).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def factory() -> Callable[[], Awaitable[Any]]:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        return lambda: rest_call(reader, writer, request)

    asyncio.run(drive(factory, 8, seconds))
    found = memory(server, work.name)
    return {
        "gateway_rss_mb": found.parent_rss_mb,
        "total_pss_mb": found.pss_mb,
        "processes": float(found.processes),
    }


# --- the whole run ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--models", default="small,heavy,text")
    parser.add_argument("--folder", default="bench/out/grpc")
    parser.add_argument("--out", default="bench/RESULTS-grpc.json")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs": [], "memory": []}
    for work in workloads(folder, args.models.split(",")):
        grpc_port = free_port()
        server = torchpool(work, grpc_port)
        with running(server, folder, work.name):
            check_same_answers(work, server.port, grpc_port)
            assert server.proc is not None
            gateway = psutil.Process(server.proc.pid)
            for round_index in range(args.rounds):
                for concurrency in concurrencies:
                    # Alternate the arms' order from round to round.
                    order = ARMS if round_index % 2 == 0 else tuple(reversed(ARMS))
                    for arm in order:
                        asyncio.run(
                            run_arm(arm, work, server.port, grpc_port, concurrency, 0.5, gateway)
                        )
                        measured = asyncio.run(
                            run_arm(
                                arm,
                                work,
                                server.port,
                                grpc_port,
                                concurrency,
                                args.duration,
                                gateway,
                            )
                        )
                        print(measured, flush=True)
                        results["runs"].append({**measured.__dict__, "round": round_index})
            results["memory"].append(
                {
                    "model": work.name,
                    "server": "torchpool, gRPC on",
                    **warm_memory(server, work, 2.0, f"/v2/models/{work.name}/infer"),
                }
            )
        plain = torchpool(work, None)
        with running(plain, folder, work.name):
            results["memory"].append(
                {
                    "model": work.name,
                    "server": "torchpool, gRPC off",
                    **warm_memory(plain, work, 2.0, f"/v2/models/{work.name}/infer"),
                }
            )
        peer = recipe(work)
        if peer is not None:
            with contextlib.suppress(Exception), running(peer, folder, work.name):
                results["memory"].append(
                    {
                        "model": work.name,
                        "server": peer.label,
                        **warm_memory(peer, work, 2.0, "/predict"),
                    }
                )
        print(results["memory"][-3:], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # what is done so far
    print(summary(results))
    return 0


def summary(results: dict[str, Any]) -> str:
    """Medians over rounds, as a Markdown table per model."""
    lines = [
        "| model | c | arm | req/s | p50 ms | p99 ms | gateway CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["model"], r["concurrency"], r["arm"]) for r in results["runs"]},
        key=lambda k: (k[0], k[1], ARMS.index(k[2])),
    )
    for model, concurrency, arm in keys:
        runs = [
            r
            for r in results["runs"]
            if (r["model"], r["concurrency"], r["arm"]) == (model, concurrency, arm)
        ]
        rps = statistics.median(r["requests"] / r["seconds"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        cpu = statistics.median(r["gateway_cpu_ms"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        lines.append(
            f"| {model} | {concurrency} | {arm} | {rps:.0f} | {p50:.2f} | {p99:.2f} "
            f"| {cpu:.3f} | {errors} |"
        )
    lines += [
        "",
        "| model | server | gateway RSS MB | total PSS MB | processes |",
        "|---|---|---|---|---|",
    ]
    for entry in results["memory"]:
        lines.append(
            f"| {entry['model']} | {entry['server']} | {entry['gateway_rss_mb']:.0f} "
            f"| {entry['total_pss_mb']:.0f} | {entry['processes']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
