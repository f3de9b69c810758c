"""The /v1 routes in-process over fakes (tests/asgi.py): what the gateway itself decides.

Which model and route a request reaches, the wire format its body goes out
in, the OpenAI shape and status of every error, API keys, and a stream's
framing (chunks, ``[DONE]``, an error event). Real workers and the real
``openai`` client answer the same routes in test_openai.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.pool import streams
from shared import protocol
from tests.asgi import Served, chunk, end, error_reply, reply, serving
from tests.fakes import on_loop

pytestmark = pytest.mark.fast

EMBED = {"model": "demo", "input": ["a", "b"]}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = b'{"object":"list","data":[]}'


def ready(served: Served, routes: list[str], stream: bool = False) -> None:
    signature = {"source": "handler", "outputs": None, "stream": stream, "openai": routes}
    served.ready(stream=stream, signature=signature)


def error(status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@on_loop
async def test_models_are_listed_and_an_unknown_one_is_a_404_naming_the_served() -> None:
    async with serving() as served:
        listed = (await served.client.get("/v1/models")).json()
        assert [model["id"] for model in listed["data"]] == ["demo"]
        assert listed["object"] == "list" and listed["data"][0]["object"] == "model"
        assert (await served.client.get("/v1/models/demo")).json()["id"] == "demo"
        missing = await served.client.get("/v1/models/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["models"] == ["demo"]
        assert missing.json()["error"]["param"] == "model"


@on_loop
async def test_an_embeddings_body_goes_to_the_worker_untouched() -> None:
    async with serving() as served:
        ready(served, ["embeddings"])
        served.answer = lambda sent: [reply(sent, ANSWER, protocol.FMT_JSON)]
        raw = orjson.dumps(EMBED)
        answer = await served.client.post("/v1/embeddings", content=raw)
        assert answer.status_code == 200 and answer.content == ANSWER
        assert answer.headers["content-type"] == "application/json"
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_OPENAI_EMBEDDINGS and sent.frames == [raw]
        assert "stream" not in sent.header


@on_loop
async def test_a_model_serves_only_its_declared_routes_unless_its_setting_says() -> None:
    async with serving() as served:
        ready(served, ["chat"], stream=True)
        refused = await served.client.post("/v1/embeddings", json=EMBED)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "model"
        assert "/v1/chat/completions" in refused.json()["error"]["message"]
        assert served.requests() == []
    async with serving(openai=("embeddings",)) as served:
        ready(served, [])
        served.answer = lambda sent: [reply(sent, ANSWER, protocol.FMT_JSON)]
        assert (await served.client.post("/v1/embeddings", json=EMBED)).status_code == 200


@on_loop
async def test_a_body_without_a_readable_envelope_never_reaches_a_worker() -> None:
    async with serving() as served:
        ready(served, ["chat"], stream=True)
        unknown = await served.client.post("/v1/chat/completions", json={**CHAT, "model": "x"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        nameless = await served.client.post("/v1/chat/completions", json={"messages": []})
        assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "model"
        odd = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": "yes"})
        assert odd.json()["error"]["param"] == "stream"
        assert (await served.client.post("/v1/chat/completions", content=b"{")).status_code == 400
        assert served.requests() == []
        # The rest of the body is the worker's to check: its 400 comes back in OpenAI's shape.
        served.answer = lambda sent: [
            error_reply(sent, "bad_request", "parameter 'tools' is not supported", param="tools")
        ]
        tools = await served.client.post("/v1/chat/completions", json={**CHAT, "tools": []})
        assert tools.json() == error(
            400, "parameter 'tools' is not supported", "tools", "bad_request"
        )


@on_loop
async def test_a_chat_stream_is_chunks_then_done() -> None:
    async with serving() as served:
        ready(served, ["chat"], stream=True)
        served.answer = lambda sent: [
            chunk(sent, 0, {"choices": [{"delta": {"content": "a"}}]}),
            chunk(sent, 1, {"choices": [{"delta": {}, "finish_reason": "stop"}]}),
            end(sent),
        ]
        answer = await served.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream"
        assert answer.text == (
            'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
            "data: [DONE]\n\n"
        )
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_OPENAI_CHAT
        assert sent.header["stream"] is True and sent.header["credit"] == streams.CREDIT


@on_loop
async def test_stream_errors_before_and_after_the_first_chunk() -> None:
    async with serving() as served:
        ready(served, ["chat"], stream=True)
        served.answer = lambda sent: [
            chunk(sent, 0, {"choices": []}),
            error_reply(sent, "model_error", "the generator raised"),
        ]
        body = {**CHAT, "stream": True}
        answer = await served.client.post("/v1/chat/completions", json=body)
        failed = error(500, "the generator raised", None, "model_error")
        assert answer.text == (
            'data: {"choices":[]}\n\nevent: error\ndata: ' + orjson.dumps(failed).decode() + "\n\n"
        )
        served.answer = lambda sent: [error_reply(sent, "shape_mismatch", "too long")]
        early = await served.client.post("/v1/chat/completions", json=body)
        assert early.status_code == 400  # OpenAI's status for every bad request
        assert early.json() == error(400, "too long", None, "shape_mismatch")


@on_loop
async def test_keys_methods_and_paths() -> None:
    async with serving(api_key="sk-1") as served:
        ready(served, ["embeddings"])
        served.answer = lambda sent: [reply(sent, ANSWER, protocol.FMT_JSON)]
        anonymous = await served.client.get("/v1/models")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "authentication_error"
        key = {"authorization": "Bearer sk-1"}
        assert (await served.client.get("/v1/models", headers=key)).status_code == 200
        ok = await served.client.post("/v1/embeddings", json=EMBED, headers=key)
        assert ok.status_code == 200
        wrong_method = await served.client.get("/v1/embeddings", headers=key)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        unknown = await served.client.post("/v1/images/generations", json={}, headers=key)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_url"


@on_loop
async def test_a_body_over_the_models_limit_is_a_413() -> None:
    async with serving(max_body_mb=0.001) as served:
        ready(served, ["embeddings"])
        big = await served.client.post("/v1/embeddings", json={**EMBED, "input": ["x" * 2000]})
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "payload_too_large"
