"""Real tier: the gRPC service with the stock clients (tritonclient.grpc, grpc's own stubs).

One gateway serves three models the tests share in order: ``demo`` (the MLP,
two workers), ``counter`` (tests.v2models:RowCounter: BYTES in, two outputs, a
slow pass, a queue of one) and ``stream`` (tests.streams:Counter, a streaming
handler), with an API key and an admin token. The worker-kill case runs last.
The client side uses tritonclient's own generated code, never torchpool's, so
each message crosses the wire between two independent builds of the .proto.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import Server, free_port, wait_for
from tests.test_streaming import closed_count

KEY = "grpc-key"
ADMIN = "grpc-admin"
AUTH = {"authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
ROW = 16
FOREVER = 100_000


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc-streams") / "closed.txt"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, marker: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("grpc")
    config = folder / "torchpool.toml"
    config.write_text(
        f"""
        [server]
        api_key = "{KEY}"
        admin_token = "{ADMIN}"
        grpc_port = {free_port()}
        heartbeat_s = 0.5

        [models.demo]
        workers = 2
        max_body_mb = 1

        [models.counter]
        handler = "tests.v2models:RowCounter"
        model_kwargs = {{ sleep_s = 0.3 }}
        workers = 1
        max_batch_size = 1
        queue_size = 1

        [models.stream]
        handler = "tests.streams:Counter"
        model_kwargs = {{ marker = "{marker}" }}
        workers = 1
        """
    )
    server = Server(["--config", str(config)], folder / "serve.log")
    try:
        server.wait_ready(4)
        server.client.headers.update(AUTH)
        yield server
    finally:
        server.stop()


def grpc_address(server: Server) -> str:
    text = Path(server.log_path).parent.joinpath("torchpool.toml").read_text()
    port = next(line.split("=")[1].strip() for line in text.splitlines() if "grpc_port" in line)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[tgrpc.InferenceServerClient]:
    triton = tgrpc.InferenceServerClient(grpc_address(server))
    try:
        yield triton
    finally:
        triton.close()


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def rows(n: int) -> np.ndarray[Any, Any]:
    return np.arange(n * ROW, dtype=np.float32).reshape(n, ROW) / 100


def fp32_input(data: np.ndarray[Any, Any], name: str = "input__0") -> tgrpc.InferInput:
    tensor = tgrpc.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def rest_infer(server: Server, model: str, body: dict[str, Any]) -> httpx.Response:
    return server.client.post(f"/v2/models/{model}/infer", json=body)


def code_and_message(call: Any) -> tuple[str, str]:
    """The status (as tritonclient names it, e.g. ``StatusCode.NOT_FOUND``) and message
    of the error ``call`` raises."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), str(caught.value.message())


# --- inference ------------------------------------------------------------------


def test_binary_infer_matches_rest(server: Server, client: tgrpc.InferenceServerClient) -> None:
    data = rows(3)
    result = client.infer("demo", [fp32_input(data)], headers=AUTH)
    got = result.as_numpy("output__0")
    assert got.shape == (3, 4) and got.dtype == np.float32
    body = {
        "inputs": [
            {"name": "x", "shape": [3, ROW], "datatype": "FP32", "data": data.ravel().tolist()}
        ]
    }
    rest = rest_infer(server, "demo", body).json()["outputs"][0]["data"]
    assert np.allclose(got.ravel(), rest, atol=1e-6)
    response = result.get_response()
    assert response.model_name == "demo" and response.model_version == "1"


def test_typed_contents_of_every_kind(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    data = rows(2)
    reference = None
    for datatype, field, values in (
        ("FP32", "fp32_contents", data.ravel().tolist()),
        ("FP64", "fp64_contents", data.astype(np.float64).ravel().tolist()),
    ):
        request = service_pb2.ModelInferRequest(model_name="demo", id="typed")
        tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, ROW])
        getattr(tensor.contents, field).extend(values)
        response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert response.id == "typed"
        out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        if reference is None:
            reference = out
        assert np.allclose(out, reference, atol=1e-5)
    # Integers go to the model's float32, as over REST.
    ints = service_pb2.ModelInferRequest(model_name="demo")
    ints.inputs.add(name="x", datatype="INT64", shape=[1, ROW]).contents.int64_contents.extend(
        range(ROW)
    )
    assert len(stub.ModelInfer(ints, metadata=tuple(AUTH.items())).raw_output_contents[0]) == 16
    # BYTES as typed contents, to a handler that counts their lengths.
    strings = service_pb2.ModelInferRequest(model_name="counter")
    strings.inputs.add(name="t", datatype="BYTES", shape=[1, 4]).contents.bytes_contents.extend(
        [b"ab", b"abc", b"", b"x"]
    )
    answer = stub.ModelInfer(strings, metadata=tuple(AUTH.items()))
    named = {o.name: raw for o, raw in zip(answer.outputs, answer.raw_output_contents, strict=True)}
    assert struct.unpack("<f", named["total"]) == (6.0,)
    # A value that does not fit its datatype is the client's error.
    small = service_pb2.ModelInferRequest(model_name="demo")
    small.inputs.add(name="x", datatype="INT8", shape=[1, ROW]).contents.int_contents.extend(
        [300] * ROW
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(small, metadata=tuple(AUTH.items()))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not fit INT8" in str(caught.value.details())


def test_bytes_in_and_several_outputs(client: tgrpc.InferenceServerClient) -> None:
    strings = tgrpc.InferInput("text", [2, 4], "BYTES")
    strings.set_data_from_numpy(
        np.array([[b"ab", b"abc", b"", b"x"], [b"", b"", b"", b"four"]], dtype=np.object_)
    )
    result = client.infer("counter", [strings], headers=AUTH)
    assert result.as_numpy("total").tolist() == [[6.0], [4.0]]
    assert result.as_numpy("rows").dtype == np.int64
    only = client.infer(
        "counter", [strings], outputs=[tgrpc.InferRequestedOutput("rows")], headers=AUTH
    )
    assert only.as_numpy("total") is None and only.as_numpy("rows").shape == (2, 1)


def test_metadata_readiness_and_routing(client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo", headers=AUTH)
    assert client.is_model_ready("counter", "1", headers=AUTH)
    metadata = client.get_server_metadata()
    assert metadata.name == "torchpool"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(metadata.extensions)
    demo = client.get_model_metadata("demo", headers=AUTH)
    assert [(i.name, i.datatype, list(i.shape)) for i in demo.inputs] == [
        ("input__0", "FP32", [-1, ROW])
    ]
    assert demo.versions == ["1"]
    counter = client.get_model_metadata("counter", "1", headers=AUTH)
    assert list(counter.inputs[0].shape) == [-1, 4]
    # The same row shape goes to the model it names.
    four = fp32_input(np.ones((1, 4), dtype=np.float32), "x")
    assert client.infer("counter", [four], headers=AUTH).as_numpy("total").tolist() == [[4.0]]
    status, message = code_and_message(lambda: client.infer("demo", [four], headers=AUTH))
    assert status == "StatusCode.INVALID_ARGUMENT" and "expected shape [N, 16]" in message
    status, message = code_and_message(lambda: client.get_model_metadata("demo", "2", headers=AUTH))
    assert status == "StatusCode.NOT_FOUND" and "has no version '2'" in message


# --- errors ---------------------------------------------------------------------


def test_error_codes_carry_the_rest_messages(
    server: Server, client: tgrpc.InferenceServerClient
) -> None:
    data = rows(1)
    status, message = code_and_message(
        lambda: client.infer("nope", [fp32_input(data)], headers=AUTH)
    )
    rest = rest_infer(server, "nope", {"inputs": []})
    assert status == "StatusCode.NOT_FOUND" and message == rest.json()["error"]

    bad = fp32_input(np.ones((1, 15), dtype=np.float32))
    status, message = code_and_message(lambda: client.infer("demo", [bad], headers=AUTH))
    body = {"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [1.0] * 15}]}
    assert (
        status == "StatusCode.INVALID_ARGUMENT"
        and message == rest_infer(server, "demo", body).json()["error"]
    )

    two = [fp32_input(data, "a"), fp32_input(data, "b")]
    status, message = code_and_message(lambda: client.infer("demo", two, headers=AUTH))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message == "the model takes one input tensor; the request has 2: a, b"

    status, message = code_and_message(lambda: client.infer("demo", [fp32_input(data)]))
    assert status == "StatusCode.UNAUTHENTICATED"
    assert (
        message
        == server.client.post("/v2/models/demo/infer", headers={"authorization": ""}).json()[
            "error"
        ]
    )

    big = fp32_input(np.zeros((20_000, ROW), dtype=np.float32))  # 1.2 MiB, past max_body_mb 1
    status, message = code_and_message(lambda: client.infer("demo", [big], headers=AUTH))
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "exceeds the limit of 1048576" in message

    status, _ = code_and_message(
        lambda: client.infer(
            "counter", [fp32_input(np.ones((1, 4), np.float32))], headers=AUTH, client_timeout=0.05
        )
    )
    assert status == "StatusCode.DEADLINE_EXCEEDED"


def test_a_full_queue_is_resource_exhausted(client: tgrpc.InferenceServerClient) -> None:
    four = fp32_input(np.ones((1, 4), dtype=np.float32))

    def one() -> str:
        try:
            client.infer("counter", [four], headers=AUTH)
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: one(), range(8)))
    refused = [o for o in outcomes if o != "OK"]
    assert refused and "OK" in outcomes, outcomes
    assert all(
        o.startswith("StatusCode.RESOURCE_EXHAUSTED") and "queue is full" in o for o in refused
    )


def test_no_ready_worker_is_unavailable(
    server: Server, client: tgrpc.InferenceServerClient
) -> None:
    resize = "/admin/models/counter/workers"
    assert server.client.put(resize, json={"workers": 0}, headers=ADMIN_AUTH).status_code == 200
    try:
        four = fp32_input(np.ones((1, 4), dtype=np.float32))
        wait_for(
            lambda: not client.is_model_ready("counter", headers=AUTH), 30, "no counter worker"
        )
        status, message = code_and_message(lambda: client.infer("counter", [four], headers=AUTH))
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
        assert status == "StatusCode.UNAVAILABLE"
        assert message == rest_infer(server, "counter", body).json()["error"]
    finally:
        server.client.put(resize, json={"workers": 1}, headers=ADMIN_AUTH)
    wait_for(lambda: client.is_model_ready("counter", headers=AUTH), 60, "a counter worker again")


# --- streaming --------------------------------------------------------------------


class Collector:
    """tritonclient's stream callback: every (result, error) in a queue."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def take(self, timeout_s: float = 30.0) -> tuple[Any, Any]:
        return self.items.get(timeout=timeout_s)


def counter_row(count: int, interval_s: float) -> tgrpc.InferInput:
    return fp32_input(np.array([[count, interval_s, -1]], dtype=np.float32), "x")


def test_stream_one_response_per_output_then_final(client: tgrpc.InferenceServerClient) -> None:
    collector = Collector()
    client.start_stream(callback=collector, headers=AUTH)
    try:
        client.async_stream_infer(
            "stream", [counter_row(5, 0.0)], request_id="s1", enable_empty_final_response=True
        )
        outputs, final = [], None
        while final is None:
            result, error = collector.take()
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            if response.parameters["triton_final_response"].bool_param:
                final = response
            else:
                outputs.append(result.as_numpy("output__0").tolist())
        assert outputs == [[0], [1], [2], [3], [4]]
        assert not final.outputs
        # A model that does not stream answers once, marked final; an error is a response.
        client.async_stream_infer("demo", [fp32_input(rows(1))], request_id="s2")
        result, error = collector.take()
        assert error is None and result.as_numpy("output__0").shape == (1, 4)
        assert result.get_response().parameters["triton_final_response"].bool_param
        client.async_stream_infer("nope", [fp32_input(rows(1))], request_id="s3")
        _, error = collector.take()
        assert "unknown model 'nope'" in error.message()
    finally:
        client.stop_stream()


def test_cancelled_stream_closes_the_generator(
    client: tgrpc.InferenceServerClient, marker: Path
) -> None:
    before = closed_count(marker)
    collector = Collector()
    client.start_stream(callback=collector, headers=AUTH)
    client.async_stream_infer("stream", [counter_row(FOREVER, 0.02)], request_id="forever")
    for _ in range(3):
        _, error = collector.take()
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    wait_for(lambda: closed_count(marker) == before + 1, 10, "the generator to be closed")
    assert client.is_model_ready("stream", headers=AUTH)


# --- health, reflection, metrics, extensions ---------------------------------------


def health_check(channel: grpc.Channel, service: str) -> Any:
    """grpc_health_probe's call: grpc.health.v1.Health/Check, with its 5 s deadline."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_and_reflection(server: Server) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(grpc_address(server)) as channel:
        for service in ("", "inference.GRPCInferenceService", "demo", "stream"):
            assert health_check(channel, service) == serving, service
        with pytest.raises(grpc.RpcError) as caught:
            health_check(channel, "nope")
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service="demo"), timeout=5)
        assert next(iter(watch)).status == serving
        watch.cancel()
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(reflection(iter([ask]), timeout=5)))
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_grpc_calls_in_metrics_and_statistics(
    server: Server, client: tgrpc.InferenceServerClient
) -> None:
    client.infer("demo", [fp32_input(rows(1))], headers=AUTH)
    text = server.get("/metrics").text
    assert 'torchpool_grpc_requests_total{code="OK",method="ModelInfer",model="demo"}' in text
    assert 'torchpool_grpc_request_duration_seconds_count{method="ModelInfer",model="demo"}' in text
    over_grpc = client.get_inference_statistics("demo", headers=AUTH).model_stats[0]
    http = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        over_http = http.get_inference_statistics("demo", headers=AUTH)["model_stats"][0]
    finally:
        http.close()
    assert over_grpc.name == "demo" and over_grpc.version == "1"
    assert over_grpc.inference_stats.success.count >= 2
    assert (
        over_http["inference_stats"]["success"]["count"] == over_grpc.inference_stats.success.count
    )
    assert over_grpc.last_inference > 0 and over_grpc.inference_stats.queue.count >= 2
    every = client.get_inference_statistics(headers=AUTH)
    assert {s.name for s in every.model_stats} == {"demo", "counter", "stream"}


def test_repository_load_and_unload_over_grpc_and_http(
    server: Server, client: tgrpc.InferenceServerClient
) -> None:
    http = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    config = orjson.dumps({"workers": 1}).decode()
    try:
        status, _ = code_and_message(
            lambda: client.load_model("extra", config=config, headers=AUTH)
        )
        assert status == "StatusCode.UNAUTHENTICATED"
        status, message = code_and_message(lambda: client.load_model("extra", headers=ADMIN_AUTH))
        assert status == "StatusCode.NOT_FOUND" and "parameters.config" in message
        client.load_model("extra", config=config, headers=ADMIN_AUTH)
        assert client.is_model_ready("extra", headers=AUTH)
        assert (
            client.infer("extra", [fp32_input(rows(1))], headers=AUTH).as_numpy("output__0")
            is not None
        )
        http.unload_model("extra", headers=ADMIN_AUTH)
        status, _ = code_and_message(lambda: client.is_model_ready("extra", headers=AUTH))
        assert status == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException):
            http.load_model("extra", config=config)  # no admin token: 401
        http.load_model("extra", config=config, headers=ADMIN_AUTH)
        assert http.is_model_ready("extra", headers=AUTH)
        client.unload_model("extra", headers=ADMIN_AUTH)
        assert "extra" not in {m.name for m in client.get_model_repository_index().models}
    finally:
        http.close()


def test_rest_extensions_as_the_docs_show(server: Server) -> None:
    """The curl lines of docs/grpc.md, on this module's server (its own admin token)."""
    extensions = server.get("/v2").json()["extensions"]
    assert extensions == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
        "model_repository",
    ]
    stats = server.get("/v2/models/demo/stats").json()["model_stats"]
    assert [s["name"] for s in stats] == ["demo"] and stats[0]["inference_stats"]["success"][
        "count"
    ]
    body = {"parameters": {"config": '{"workers": 1}'}}
    load = "/v2/repository/models/extra/load"
    assert server.client.post(load, json=body).status_code == 401
    loaded = server.client.post(load, json=body, headers=ADMIN_AUTH)
    assert loaded.status_code == 200 and loaded.json() == {}
    assert server.get("/v2/models/extra/ready").status_code == 200
    unload = "/v2/repository/models/extra/unload"
    assert server.client.post(unload, headers=ADMIN_AUTH).status_code == 200
    assert server.get("/v2/models/extra/ready").status_code == 404
    missing = server.client.post(unload, headers=ADMIN_AUTH)
    assert missing.status_code == 404 and "unknown model 'extra'" in missing.json()["error"]


def test_worker_killed_under_grpc_load_every_call_answered(
    server: Server, client: tgrpc.InferenceServerClient
) -> None:
    workers = server.health()["workers"]
    demo = [w for w in workers if w["model"] == "demo" and w["state"] in ("ready", "busy")]
    data = fp32_input(rows(4))

    def one(i: int) -> str:
        try:
            client.infer("demo", [data], headers=AUTH, client_timeout=30)
        except InferenceServerException as exc:
            return str(exc.status())
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(400)]
        wait_for(lambda: sum(f.done() for f in futures) >= 50, 30, "calls under way")
        os.kill(demo[0]["pid"], signal.SIGKILL)
        outcomes = [f.result(timeout=60) for f in futures]
    assert set(outcomes) <= {"OK", "StatusCode.UNAVAILABLE"}, set(outcomes)
    assert outcomes.count("OK") >= 300
