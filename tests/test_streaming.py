"""Real tier: streamed answers over Server-Sent Events from a real pool.

One server of two workers runs ``tests.streams:Counter``, whose request row
``[count, interval_s, fail_at]`` says how long a stream runs and where it
fails, so every case shares it; the worker-kill case runs last.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from tests.conftest import Server, wait_for
from worker.serve.streaming import generate_fields, merge_fields

SSE = {"accept": "text/event-stream"}
FOREVER = 100_000  # outputs: a stream that would run for hours if not stopped
FAST_BEATS = ("--heartbeat-s", "0.2", "--heartbeat-liveness", "3")
# How long a wait polls for a generator to be closed or a stream to show: a wide
# margin (either takes about one output, 0.05 s), not a speed asserted.
SETTLE_S = 30.0


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streams") / "closed.txt"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, marker: Path) -> Iterator[Server]:
    kwargs = orjson.dumps({"marker": str(marker)}).decode()
    args = ["--workers", "2", "--handler", "tests.streams:Counter", "--model-kwargs", kwargs]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    server = Server([*args, *FAST_BEATS, "--model-name", "counter"], log)
    try:
        server.wait_ready(2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fractions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    server = Server(["--workers", "1", "--handler", "tests.streams:Fractions"], log)
    try:
        server.wait_ready(1)
        yield server
    finally:
        server.stop()


def events(response: httpx.Response) -> Iterator[tuple[str, Any, float]]:
    """(event name, parsed data, monotonic arrival) for each Server-Sent Event."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and data:
            yield name, orjson.loads(data), time.monotonic()
            name, data = "message", ""


def stream(server: Server, row: list[float], **headers: str) -> list[tuple[str, Any, float]]:
    body = {"input_tensor": [row]}
    with server.client.stream("POST", "/predict", json=body, headers={**SSE, **headers}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "text/event-stream"
        return list(events(r))


def closed_count(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_events_arrive_one_by_one_in_order_then_end(server: Server) -> None:
    received = stream(server, [8, 0.15, -1])
    assert [data for _, data, _ in received[:-1]] == [{"output": i} for i in range(8)]
    assert received[-1][:2] == ("end", {})
    # The first event came while the generator still had about a second to run.
    first, last = received[0][2], received[-2][2]
    assert last - first > 0.6, f"events arrived together ({last - first:.2f}s apart)"


def test_without_accept_the_outputs_come_once_in_a_list(server: Server) -> None:
    response = server.predict({"input_tensor": [[4, 0, -1]]})
    assert response.status_code == 200
    assert response.json() == {"prediction": [0, 1, 2, 3]}


def test_the_same_output_prints_the_same_numbers_on_predict_and_a_stream(
    fractions: Server,
) -> None:
    body = {"input_tensor": [[1.0, 2.0], [0.1, 10.0]]}
    whole = fractions.predict(body)
    assert whole.status_code == 200, whole.text
    with fractions.client.stream("POST", "/predict", json=body, headers=SSE) as r:
        assert r.status_code == 200
        raw = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [orjson.loads(data)["output"] for data in raw[:-1]]
    assert chunks == whole.json()["prediction"]
    # float32 in its shortest form (0.33333334), not widened to float64 (0.3333333432674408),
    # on both routes: the text itself, not only the numbers it parses to.
    assert '"float32":[0.33333334,0.6666667]' in raw[0]
    assert '"float32":[0.33333334,0.6666667]' in whole.text


def test_error_mid_stream_ends_it_and_the_worker_serves_on(server: Server) -> None:
    received = stream(server, [6, 0, 2])
    assert [data for _, data, _ in received[:2]] == [{"output": 0}, {"output": 1}]
    name, data, _ = received[2]
    assert name == "error" and data["code"] == "model_error"
    assert "failed at output 2" in data["error"]
    assert len(received) == 3
    assert [d for _, d, _ in stream(server, [2, 0, -1])] == [{"output": 0}, {"output": 1}, {}]


def test_bad_input_before_any_event_is_a_plain_error(server: Server) -> None:
    response = server.client.post("/predict", json={"input_tensor": [[1, 2]]}, headers=SSE)
    assert response.status_code == 422
    assert response.json()["code"] == "shape_mismatch"


def test_client_disconnect_closes_the_generator_and_frees_the_worker(
    server: Server, marker: Path
) -> None:
    before = closed_count(marker)
    body = {"input_tensor": [[FOREVER, 0.05, -1]]}
    # Both workers get a stream that would run for hours; both clients leave.
    for _ in range(2):
        with server.client.stream("POST", "/predict", json=body, headers=SSE) as response:
            _, data, _ = next(events(response))
            assert data == {"output": 0}
    wait_for(lambda: closed_count(marker) == before + 2, SETTLE_S, "both generators closed")
    # Both workers are free again: a request held behind two endless streams
    # would wait in the queue until its deadline (504), not answer 200.
    answer = server.predict({"input_tensor": [[2, 0, -1]]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"prediction": [0, 1]}


def test_deadline_ends_a_stream_with_a_504_event(server: Server, marker: Path) -> None:
    before = closed_count(marker)
    received = stream(server, [FOREVER, 0.05, -1], **{"x-request-timeout": "1.5"})
    name, data, _ = received[-1]
    assert name == "error" and data["code"] == "deadline_exceeded"
    assert len(received) > 2
    wait_for(lambda: closed_count(marker) == before + 1, SETTLE_S, "the generator to be closed")


def test_generate_and_generate_stream(server: Server) -> None:
    whole = server.client.post("/v2/models/counter/generate", json={"text_input": [[3, 0, -1]]})
    assert whole.status_code == 200
    assert whole.json() == {"model_name": "counter", "model_version": "1", "output__0": [0, 1, 2]}
    body = {"text_input": [[2, 0, -1]], "parameters": {}}
    with server.client.stream("POST", "/v2/models/counter/generate_stream", json=body) as r:
        assert r.status_code == 200
        got = [data for _, data, _ in events(r)]
    assert got == [
        {"model_name": "counter", "model_version": "1", "output__0": i} for i in range(2)
    ]
    unknown = server.client.post("/v2/models/nope/generate_stream", json=body)
    assert unknown.status_code == 404


def test_generate_parameters_reach_a_handler_that_takes_them(server: Server) -> None:
    body = {"text_input": [[3, 0, -1]], "parameters": {"start": 10}}
    whole = server.client.post("/v2/models/counter/generate", json=body)
    assert whole.json()["output__0"] == [10, 11, 12]
    with server.client.stream("POST", "/v2/models/counter/generate_stream", json=body) as r:
        assert [data["output__0"] for _, data, _ in events(r)] == [10, 11, 12]
    bad = {"text_input": [[3, 0, -1]], "parameters": [1]}
    refused = server.client.post("/v2/models/counter/generate", json=bad)
    assert refused.status_code == 400
    assert "parameters must be a JSON object" in refused.json()["error"]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_generate_answers_the_statuses_its_openapi_documents(server: Server, route: str) -> None:
    """Triton reads a generate body as JSON whatever its Content-Type, and answers any
    invalid argument 400: so do these routes, and their OpenAPI lists no 415."""
    path = f"/v2/models/{{name}}/{route}"
    documented = server.client.get("/openapi.json").json()["paths"][path]["post"]["responses"]
    assert "415" not in documented and "400" in documented
    for content_type, body in (("text/plain", b"not json"), ("image/png", b"\x89PNG")):
        answer = server.client.post(
            f"/v2/models/counter/{route}", content=body, headers={"content-type": content_type}
        )
        assert answer.status_code == 400, answer.text
        assert str(answer.status_code) in documented
        assert set(answer.json()) == {"error"}


def streaming_worker(server: Server) -> dict[str, Any]:
    busy = wait_for(
        lambda: [w for w in server.health()["workers"] if w["inflight"]],
        SETTLE_S,
        "the streaming worker to show",
    )
    worker: dict[str, Any] = busy[0]
    return worker


def test_sigterm_mid_stream_closes_the_generator_and_ends_the_stream(
    server: Server, marker: Path
) -> None:
    before = closed_count(marker)
    body = {"input_tensor": [[FOREVER, 0.05, -1]]}
    with server.client.stream("POST", "/predict", json=body, headers=SSE) as response:
        received = events(response)
        assert next(received)[1] == {"output": 0}
        os.kill(streaming_worker(server)["pid"], signal.SIGTERM)
        rest = list(received)
    name, data, _ = rest[-1]
    assert name == "error" and data["code"] == "unavailable"
    assert "the worker is stopping (signal SIGTERM)" in data["error"]
    wait_for(lambda: closed_count(marker) == before + 1, SETTLE_S, "the generator to be closed")
    server.wait_ready(2, timeout_s=60)


def test_an_orphaned_worker_closes_its_stream_and_exits(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    marker = tmp_path / "closed.txt"
    kwargs = orjson.dumps({"marker": str(marker)}).decode()
    server = serve("--handler", "tests.streams:Counter", "--model-kwargs", kwargs, *FAST_BEATS)
    body = {"input_tensor": [[FOREVER, 0.05, -1]]}
    with server.client.stream("POST", "/predict", json=body, headers=SSE) as response:
        received = events(response)  # kept: dropping it would close the connection
        assert next(received)[1] == {"output": 0}
        worker = psutil.Process(streaming_worker(server)["pid"])
        server.proc.kill()  # the gateway dies mid-stream
    # The generator's finally ran: the worker ended the stream, not a hard exit.
    wait_for(lambda: closed_count(marker) == 1, 10, "the orphaned stream to be closed")
    wait_for(lambda: not worker.is_running(), 10, "the orphaned worker to exit")


def test_worker_killed_mid_stream_ends_it_with_an_error_event(server: Server) -> None:
    body = {"input_tensor": [[FOREVER, 0.05, -1]]}
    with server.client.stream("POST", "/predict", json=body, headers=SSE) as response:
        received = events(response)
        assert next(received)[1] == {"output": 0}
        os.kill(streaming_worker(server)["pid"], signal.SIGKILL)
        rest = list(received)
    name, data, _ = rest[-1]
    assert name == "error" and data["code"] == "unavailable"
    assert "not retried" in data["error"]
    server.wait_ready(2, timeout_s=60)


def test_generate_fields_name_outputs_and_merge_joins_text() -> None:
    assert generate_fields("a") == {"text_output": "a"}
    assert generate_fields({"x": 1}) == {"x": 1}
    assert generate_fields(2) == {"output__0": 2}
    merged = merge_fields([generate_fields("he"), generate_fields("llo")])
    assert merged == {"text_output": "hello"}
