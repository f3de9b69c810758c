"""Real tier: `torchpool serve` on the demo model with two CPU workers.

Real processes, real ZeroMQ sockets, real HTTP; process facts read from /proc.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import Server
from worker.model.demo import build_demo_model

ROWS = [[(i * 16 + j) / 100.0 - 1.0 for j in range(16)] for i in range(5)]


def in_process(rows: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        result: list[list[float]] = build_demo_model()(torch.tensor(rows)).tolist()
        return result


def assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for row_got, row_want in zip(got, want, strict=True):
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(row_got, row_want, strict=True)
        ), (row_got, row_want)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cores_from_list(text: str) -> list[int]:
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def test_predict_matches_in_process_output(demo_server: Server) -> None:
    response = demo_server.predict({"input_tensor": ROWS})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_close(response.json()["prediction"], in_process(ROWS))


def test_every_worker_serves_the_same_model(demo_server: Server) -> None:
    want = in_process(ROWS[:1])
    for _ in range(20):
        response = demo_server.predict({"input_tensor": ROWS[:1]})
        assert response.status_code == 200
        assert_close(response.json()["prediction"], want)
    served = [w["requests_served"] for w in demo_server.health()["workers"]]
    assert sum(served) >= 20


def test_health_document(demo_server: Server) -> None:
    response = demo_server.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["ready_workers"] == health["total_workers"] == 2
    assert health["gateway"]["pid"] == demo_server.pid
    gateway_rss = int(proc_status(demo_server.pid)["VmRSS"].split()[0]) * 1024
    assert abs(health["gateway"]["rss_bytes"] - gateway_rss) <= 0.2 * gateway_rss

    children = {p.pid for p in psutil.Process(demo_server.pid).children()}
    seen_cores: set[int] = set()
    for worker in health["workers"]:
        assert worker["pid"] in children, "a worker is not a child of the gateway"
        assert worker["state"] in {"ready", "busy"}
        assert worker["device"] == "cpu"
        assert worker["load_seconds"] is not None and 0 < worker["load_seconds"] < 60
        assert worker["restarts"] == 0
        assert worker["exit_code"] is None and worker["last_error"] is None
        assert worker["cuda_allocated_bytes"] is None and worker["cuda_reserved_bytes"] is None
        assert 0 <= worker["heartbeat_age_s"] < 3
        status = proc_status(worker["pid"])
        assert cores_from_list(status["Cpus_allowed_list"]) == worker["cores"]
        assert not seen_cores & set(worker["cores"]), "core sets overlap"
        seen_cores |= set(worker["cores"])
        rss = int(status["VmRSS"].split()[0]) * 1024
        assert abs(worker["rss_bytes"] - rss) <= 0.2 * rss, (worker["rss_bytes"], rss)
    assert seen_cores <= os.sched_getaffinity(0)


def test_worker_threads_match_their_core_set(demo_server: Server) -> None:
    for worker in demo_server.health()["workers"]:
        environ = psutil.Process(worker["pid"]).environ()
        assert environ["OMP_NUM_THREADS"] == str(len(worker["cores"]))


def test_probes(demo_server: Server) -> None:
    assert demo_server.get("/health/live").status_code == 200
    ready = demo_server.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["ready_workers"] == 2


@pytest.mark.parametrize(
    ("body", "content_type", "status", "needle"),
    [
        (b'{"input_tensor": [[NaN]]}', "application/json", 400, "JSON"),
        (b'{"input_tensor": [[1.0, Infinity]]}', "application/json", 400, "JSON"),
        (b'{"input_tensor": [[1.0, 2.0], [3.0]]}', "application/json", 400, ""),
        (b'{"input_tensor": [["a", "b"]]}', "application/json", 400, ""),
        (b'{"input_tensor": []}', "application/json", 400, "empty"),
        (b'{"input_tensor": 3.0}', "application/json", 400, ""),
        (b'{"tensor": [[1.0]]}', "application/json", 400, "input_tensor"),
        (b"not json", "application/json", 400, "JSON"),
        (b"", "application/json", 400, "empty"),
        (b'{"input_tensor": [[1.0]]}', "text/plain", 415, "application/json"),
        (b'{"input_tensor": [[1.0]]}', "", 415, "application/json"),
    ],
)
def test_bad_input_is_a_clear_client_error(
    demo_server: Server, body: bytes, content_type: str, status: int, needle: str
) -> None:
    pids = demo_server.worker_pids()
    headers = {"content-type": content_type} if content_type else {}
    response = demo_server.client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["error"], str) and error["error"]
    assert needle.lower() in error["error"].lower()
    # Nothing is lost: the same workers live on and still answer.
    assert demo_server.worker_pids() == pids
    assert demo_server.predict({"input_tensor": ROWS[:1]}).status_code == 200


def test_shape_mismatch_names_expected_and_received(demo_server: Server) -> None:
    response = demo_server.predict({"input_tensor": [[1.0] * 15, [2.0] * 15]})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "shape_mismatch"
    assert error["expected"] == [-1, 16]
    assert error["received"] == [2, 15]
    assert "16" in error["error"] and "15" in error["error"]


def test_unknown_route_is_a_json_404(demo_server: Server) -> None:
    response = demo_server.get("/nope")
    assert response.status_code == 404
    assert "error" in response.json()


def test_oversized_body_is_413(serve: object) -> None:
    server = serve("--workers", "1", "--max-body-mb", "0.01")  # type: ignore[operator]
    big = {"input_tensor": [[0.5] * 16] * 200}
    response = server.predict(big)
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["error"]
    assert server.predict({"input_tensor": ROWS[:1]}).status_code == 200
