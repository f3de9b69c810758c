"""The streaming GPT-2 example (examples/text_generation.py) served for real."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from tests.conftest import Server
from tests.test_streaming import SSE, events

TOKENS = 12


def test_gpt2_example_streams_one_character_per_event(serve: Callable[..., Server]) -> None:
    kwargs = orjson.dumps({"max_new_tokens": TOKENS}).decode()
    server = serve(
        "--workers",
        "1",
        "--handler",
        "examples.text_generation:TextGenerator",
        "--model-kwargs",
        kwargs,
        "--model-name",
        "gpt",
        ready=None,
    )
    # Importing transformers is slow on a busy machine.
    server.wait_ready(1, timeout_s=240)
    body = {"input_tensor": "Once upon a time"}
    with server.client.stream("POST", "/predict", json=body, headers=SSE) as response:
        assert response.status_code == 200
        received = list(events(response))
    assert received[-1][0] == "end"
    chars = [data["output"] for _, data, _ in received[:-1]]
    assert len(chars) == TOKENS
    assert all(isinstance(c, str) and len(c) == 1 for c in chars)
    whole = server.client.post("/v2/models/gpt/generate", json={"text_input": "Once upon a time"})
    # Sampling is seeded per request: the same prompt gives the same text.
    assert whole.json()["text_output"] == "".join(chars)
    # A request's parameters may ask for fewer characters than the server's maximum.
    five = {"text_input": "Once upon a time", "parameters": {"max_new_tokens": 5}}
    shorter = server.client.post("/v2/models/gpt/generate", json=five)
    assert shorter.json()["text_output"] == "".join(chars[:5])
    refused = server.client.post("/predict", json={"input_tensor": "caf\u00e9"}, headers=SSE)
    assert refused.status_code == 400
    assert "printable ASCII" in refused.json()["error"]
