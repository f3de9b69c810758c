"""Real tier: what `torchpool serve` says as it runs, and HEAD on the status page.

One server of two demo models, its access log on from the config file: the
start-up line says where it listens, each request is one access line, and
every line about a worker names its model (both models have a worker 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, wait_for

CONFIG = """
[server]
access_log = true

[models.alpha]
workers = 1

[models.beta]
workers = 1
"""
ROW = [0.5] * 16


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("startup")
    config = folder / "torchpool.toml"
    config.write_text(CONFIG)
    server = Server(["--config", str(config)], folder / "serve.log")
    try:
        server.wait_ready(2)
        yield server
    finally:
        server.stop()


def test_start_up_says_where_it_listens(two_models: Server) -> None:
    wait_for(
        lambda: f"listening on http://127.0.0.1:{two_models.port}" in two_models.log(),
        10,
        "the listening line",
    )


def test_every_worker_line_names_its_model(two_models: Server) -> None:
    log = two_models.log()
    for model in ("alpha", "beta"):
        assert re.search(rf"{model} worker 0 spawned: pid \d+", log), log
        assert f"{model} worker 0 ready in" in log, log
    assert not re.search(r"\] worker 0 spawned|: worker 0 spawned", log), log


def test_the_access_log_has_one_line_per_request(two_models: Server) -> None:
    assert two_models.client.post("/predict/alpha", json={"input_tensor": [ROW]}).status_code == 200
    assert two_models.client.get("/no/such/route").status_code == 404
    wait_for(
        lambda: (
            '"POST /predict/alpha HTTP/1.1" 200' in two_models.log()
            and '"GET /no/such/route HTTP/1.1" 404' in two_models.log()
        ),
        10,
        "the two access lines",
    )


def test_the_access_log_is_off_by_default(tmp_path: Path) -> None:
    server = Server(["--workers", "1"], tmp_path / "quiet.log")
    try:
        server.wait_ready(1)
        assert server.predict({"input_tensor": [ROW]}).status_code == 200
        wait_for(lambda: "listening on http://" in server.log(), 10, "the listening line")
        assert "POST /predict HTTP/1.1" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/", "/status"])
def test_head_on_the_status_page_answers_as_get_without_a_body(
    two_models: Server, path: str
) -> None:
    got = two_models.client.get(path)
    head = two_models.client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.content == b""
