"""Real tier: a handler that reads what clients send (JSON text, raw text,
uploads) and batches variable-length pytrees, through real HTTP and workers.

The raw-body tests need the gateway to pass non-JSON bodies through as
``fmt == "raw"`` (the hw-gateway branch); before that merge the gateway
answers them 415 itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Server

TOKENS = ("--handler", "tests.handler_zoo:ByteTokens", "--workers", "1")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = [*TOKENS, "--model-kwargs", '{"sleep_s": 0.3}', "--max-batch-size", "8"]
    server = Server(args, tmp_path_factory.mktemp("tokens") / "serve.log")
    try:
        yield server.wait_ready(1)
    finally:
        server.stop()


def fire(server: Server, payloads: list[Any]) -> list[httpx.Response]:
    answers: list[Any] = [None] * len(payloads)
    start = threading.Barrier(len(payloads))

    def call(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start.wait()
            answers[index] = client.post("/predict", json={"input_tensor": payloads[index]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return answers


def test_variable_length_dicts_are_padded_and_batched_together(tokens: Server) -> None:
    texts = ["abc", "abcd", "abcde", "abcdef", "xyz", "hello", "hi there", "four"]
    answers = fire(tokens, texts)
    shared = 0
    for text, answer in zip(texts, answers, strict=True):
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["prediction"]
        assert prediction["length"] == [len(text)]
        (rows, padded), ids = prediction["batch"][0], prediction["ids"][0]
        assert padded >= len(text) and len(ids) == padded  # per-token output keeps the padding
        assert ids[: len(text)] == list(text.encode()) and set(ids[len(text) :]) <= {0}
        shared = max(shared, rows)
    assert shared > 1, "no two requests of different lengths ever shared a forward pass"


def test_a_preprocess_error_is_400_and_the_worker_serves_on(tokens: Server) -> None:
    pids = tokens.worker_pids()
    answer = tokens.predict({"input_tensor": "boom"})
    assert answer.status_code == 400
    assert (
        answer.json()["error"]
        == "preprocess rejected the input: ValueError: cannot tokenize 'boom'"
    )
    answer = tokens.predict({"input_tensor": ["ok", "fine"]})
    assert answer.status_code == 200 and answer.json()["prediction"]["length"] == [2, 4]
    assert tokens.worker_pids() == pids


def test_a_raw_text_body(tokens: Server) -> None:
    answer = tokens.client.post(
        "/predict", content="héllo".encode(), headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction"]["length"] == [len("héllo".encode())]


def test_a_multipart_upload(tokens: Server) -> None:
    files = {"file": ("note.txt", b"uploaded text", "text/plain")}
    answer = tokens.client.post("/predict", files=files, data={"lang": "en"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction"]["length"] == [len(b"uploaded text")]


def test_a_type_the_handler_does_not_accept_is_415(tokens: Server) -> None:
    answer = tokens.client.post(
        "/predict", content=b"\x89PNG", headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 415
    message = answer.json()["error"]
    assert "text/plain, application/octet-stream" in message and "image/png" in message
