"""Real tier: dynamic batching through real workers.

``tests.zoo:BatchProbe`` answers each row with its own first value and the size
of the forward pass it ran in, so these tests see batching from the outside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import Server
from tests.zoo import BatchProbe

PROBE = ("--handler", "tests.zoo:BatchProbe", "--workers", "1")


def fire(server: Server, bodies: list[list[list[float]]]) -> list[httpx.Response]:
    """Send every body at once, from its own thread; the answers in the same order."""
    answers: list[Any] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def call(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            start.wait()
            answers[index] = client.post("/predict", json={"input_tensor": bodies[index]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows(
    serve: Callable[..., Server],
) -> None:
    # A slow forward pass lets requests pile up behind the first one.
    server = serve(*PROBE, "--model-kwargs", '{"sleep_s": 0.2}', "--max-batch-size", "8")
    bodies = [[[float(i * 10 + r), 1.0] for r in range(1 + i % 3)] for i in range(12)]
    answers = fire(server, bodies)
    biggest = 0
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        rows = answer.json()["prediction"]
        assert [row[0] for row in rows] == [row[0] for row in body]  # own rows, in order
        biggest = max(biggest, int(rows[0][1]))
        assert all(row[1] <= 8 for row in rows)  # never past --max-batch-size rows
    assert biggest > 1, "no two requests ever shared a forward pass"


def test_rows_of_different_shapes_are_not_stacked(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--model-kwargs", '{"sleep_s": 0.2}', "--max-batch-size", "16")
    bodies = [[[float(i)] * (2 if i % 2 else 5)] for i in range(10)]
    for body, answer in zip(bodies, fire(server, bodies), strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["prediction"][0][0] == body[0][0]


def test_a_bad_request_fails_alone(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--model-kwargs", '{"sleep_s": 0.2}', "--max-batch-size", "16")
    bodies = [[[float(i), 0.0]] for i in range(8)]
    bodies[5] = [[BatchProbe.POISON, 0.0]]
    answers = fire(server, bodies)
    for index, answer in enumerate(answers):
        if index == 5:
            assert answer.status_code == 500
            assert "poisoned" in answer.json()["error"]
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["prediction"][0][0] == float(index)
    assert server.worker_pids(), "the worker lives on"


def test_batch_size_one_never_batches(serve: Callable[..., Server]) -> None:
    server = serve(*PROBE, "--model-kwargs", '{"sleep_s": 0.05}', "--max-batch-size", "1")
    answers = fire(server, [[[float(i), 0.0]] for i in range(8)])
    assert all(a.status_code == 200 and a.json()["prediction"][0][1] == 1.0 for a in answers)


def test_a_lone_request_does_not_wait_out_the_batch_delay(serve: Callable[..., Server]) -> None:
    # A delay of 120 s, past the requests' 30 s deadline (--timeout-s): a request
    # that waited it out would be answered 504, so a 200 says it did not wait,
    # with no clock read here that a slow machine could break.
    delay = ("--max-batch-delay-ms", "120000", "--timeout-s", "30")
    server = serve(*PROBE, "--max-batch-size", "16", *delay)
    for row in ([1.0, 2.0], [3.0, 4.0]):
        answer = server.predict({"input_tensor": [row]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["prediction"] == [[row[0], 1.0]]
