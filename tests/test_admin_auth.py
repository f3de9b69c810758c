"""Real tier: API keys, the admin token, and resizing the pool while it serves."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psutil

from tests.conftest import Server, gone, wait_for
from tests.load import Load

ROW = [0.1] * 16
KEYS = {"TORCHPOOL_API_KEY": "first-key,second-key"}


def test_api_key_guards_inference_but_not_probes(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1", env=KEYS)
    body = {"input_tensor": [ROW]}
    missing = server.client.post("/predict", json=body)
    assert missing.status_code == 401
    assert missing.json()["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].lower().startswith("bearer")
    wrong = server.client.post("/predict", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    prefix = server.client.post("/predict", json=body, headers={"authorization": "Bearer first-ke"})
    assert prefix.status_code == 401
    for key in ("first-key", "second-key"):
        ok = server.client.post("/predict", json=body, headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
    assert server.get("/health").status_code == 200
    assert server.get("/health/ready").status_code == 200
    assert server.get("/health/live").status_code == 200


def test_every_401_carries_a_bearer_challenge(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "0", env={**KEYS, "TORCHPOOL_ADMIN_TOKEN": "s3cret"}, ready=None)
    wait_for(server.live, 60, "the gateway to answer")
    for method, path in (
        ("GET", "/admin/workers"),
        ("PUT", "/admin/workers"),
        ("POST", "/predict"),
        ("POST", "/v2/models/demo/infer"),
    ):
        for headers in ({}, {"authorization": "Bearer wrong"}):
            response = server.client.request(method, path, json={}, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == 'Bearer realm="torchpool"', path


def test_admin_endpoints_are_off_without_a_token(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1")
    assert server.client.put("/admin/workers", json={"workers": 2}).status_code == 404


def test_scaling_up_and_down_while_serving(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1", env={"TORCHPOOL_ADMIN_TOKEN": "s3cret"})
    admin = {"authorization": "Bearer s3cret"}
    assert server.client.put("/admin/workers", json={"workers": 2}).status_code == 401
    bad = server.client.put("/admin/workers", json={"workers": -1}, headers=admin)
    assert bad.status_code == 400
    with Load(server.url, threads=3) as load:
        grown = server.client.put("/admin/workers", json={"workers": 2}, headers=admin)
        assert grown.status_code == 200, grown.text
        assert grown.json()["target_workers"] == 2
        server.wait_ready(2)
        pids = server.worker_pids()
        before = load.answered
        wait_for(lambda: load.answered > before + 30, 30, "load on the grown pool")
        shrunk = server.client.put("/admin/workers", json={"workers": 1}, headers=admin)
        assert shrunk.status_code == 200
        wait_for(lambda: server.health()["total_workers"] == 1, 30, "the pool to shrink")
        removed = pids[1]
        wait_for(lambda: gone(removed), 30, "the removed worker to exit")
        before = load.answered
        wait_for(lambda: load.answered > before + 30, 30, "load on the shrunk pool")
    assert load.errors == []
    assert set(load.statuses) == {200}, load.statuses
    health = server.health()
    assert health["ready_workers"] == 1


def test_sigttin_and_sigttou_resize_the_pool(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1")
    server.proc.send_signal(signal.SIGTTIN)
    wait_for(lambda: server.health()["total_workers"] == 2, 30, "SIGTTIN to add a worker")
    server.wait_ready(2)
    # The first worker holds every usable core, so the newcomer shares them, and says so.
    cores = [w["cores"] for w in server.health()["workers"]]
    assert set(cores[1]) <= set(psutil.Process().cpu_affinity())
    if cores[1] == cores[0]:
        assert "shares cores" in server.log()
    server.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: server.health()["total_workers"] == 1, 30, "SIGTTOU to remove one")
    assert server.predict({"input_tensor": [ROW]}).status_code == 200
