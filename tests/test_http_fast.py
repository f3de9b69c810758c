"""/predict, its Server-Sent Events and the probes, in-process over fakes (tests/asgi.py).

What the gateway itself decides: the wire format a body goes out in, the
status and JSON body of each error (503 with Retry-After, 504, 413, 401 with
its challenge, 405, 404), worker error codes turned into statuses, and a
client that leaves while its request waits. Real workers answer the same
routes in test_hostile_input.py, test_faults.py, test_streaming.py and
test_admin_auth.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgpack
import orjson
import pytest
from starlette.types import Message as AsgiMessage

from gateway.api.predict import PREDICT_PATH
from gateway.pool import streams
from shared import protocol
from tests.asgi import Message, chunk, end, error_reply, reply, serving
from tests.fakes import Sent, eventually, on_loop

pytestmark = pytest.mark.fast

BODY = {"input_tensor": [[0.5] * 16]}
PREDICTION = b'{"prediction":[[1.0,2.0]]}'


def prediction(sent: Sent) -> Sequence[Message]:
    return [reply(sent, PREDICTION)]


# --- /predict: bodies go to the worker as they came ---------------------------------


@on_loop
async def test_a_json_body_goes_to_the_worker_untouched_and_its_reply_comes_back() -> None:
    async with serving() as served:
        served.ready()
        served.answer = prediction
        raw = orjson.dumps(BODY)
        answer = await served.client.post(
            "/predict", content=raw, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.content == PREDICTION
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_JSON and sent.frames == [raw]
        assert "ctype" not in sent.header and "stream" not in sent.header


@on_loop
async def test_a_msgpack_body_goes_as_msgpack_and_is_answered_in_msgpack() -> None:
    tensor = {"dtype": "float32", "shape": [1, 2], "data": b"\x00" * 8}
    raw = msgpack.packb({"input_tensor": tensor})
    answer_body = msgpack.packb({"prediction": tensor})
    async with serving() as served:
        served.ready()
        served.answer = lambda sent: [reply(sent, answer_body)]
        answer = await served.client.post(
            "/predict", content=raw, headers={"content-type": "application/x-msgpack"}
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/msgpack"
        assert msgpack.unpackb(answer.content) == {"prediction": tensor}
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_MSGPACK and sent.frames == [raw]


@on_loop
async def test_another_media_type_goes_raw_and_the_workers_415_is_answered() -> None:
    async with serving() as served:
        served.ready()
        message = "this model takes no raw input; send application/json"
        served.answer = lambda sent: [
            error_reply(sent, "unsupported_media_type", message, media_type="image/png")
        ]
        answer = await served.client.post(
            "/predict", content=b"\x89PNG", headers={"content-type": "image/png; q=1"}
        )
        assert answer.status_code == 415
        assert answer.json() == {
            "error": message,
            "code": "unsupported_media_type",
            "media_type": "image/png",
        }
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_RAW
        assert sent.header["ctype"] == "image/png; q=1"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("bad_request", 400),
        ("shape_mismatch", 422),
        ("invalid_value", 422),
        ("payload_too_large", 413),
        ("model_error", 500),
        ("no_such_code_yet", 500),
    ],
)
def test_a_workers_error_code_is_answered_with_its_status(code: str, status: int) -> None:
    @on_loop
    async def run() -> None:
        async with serving() as served:
            served.ready()
            served.answer = lambda sent: [
                error_reply(sent, code, "what went wrong", expected=[16], received=[3])
            ]
            answer = await served.client.post("/predict", json=BODY)
            assert answer.status_code == status
            document = answer.json()
            assert document["error"] == "what went wrong"
            assert document["expected"] == [16] and document["received"] == [3]
            # A worker's failure says nothing of whether to come back later.
            assert "retry-after" not in answer.headers

    run()


# --- /predict: what the gateway answers without a worker ---------------------------


@on_loop
async def test_no_ready_worker_is_503_with_retry_after_and_nothing_is_sent() -> None:
    async with serving() as served:
        answer = await served.client.post("/predict", json=BODY)
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json() == {"error": "no worker is ready (1 starting)", "code": "unavailable"}
        assert served.requests() == []


@on_loop
async def test_a_full_queue_is_503_with_retry_after_at_once() -> None:
    async with serving(queue_size=1) as served:
        served.ready(capacity=1)
        served.answer = None  # the worker holds what it gets
        runtime = served.runtime.model()
        held = asyncio.ensure_future(served.client.post("/predict", json=BODY))
        queued = asyncio.ensure_future(served.client.post("/predict", json=BODY))
        await eventually(lambda: runtime.dispatcher.queued == 1, "one request on the worker")
        refused = await served.client.post("/predict", json=BODY)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "all workers are busy and the queue is full (1 waiting)"
        # The worker answers; the queued request goes to it next, and both get 200.
        served.answer = prediction
        [first] = served.requests()
        served.wire.deliver(first.identity, reply(first, PREDICTION))
        assert [(await r).status_code for r in (held, queued)] == [200, 200]
        assert len(served.requests()) == 2


@on_loop
async def test_past_the_deadline_is_504_and_a_late_reply_is_dropped() -> None:
    async with serving() as served:
        served.ready()
        served.answer = None
        answer = await served.client.post(
            "/predict", json=BODY, headers={"x-request-timeout": "0.05"}
        )
        assert answer.status_code == 504
        assert answer.json() == {
            "error": "no answer within the deadline of 0.05s",
            "code": "deadline_exceeded",
        }
        [sent] = served.requests()
        assert 0 < sent.header["timeout_ms"] <= 50
        served.wire.deliver(sent.identity, reply(sent, PREDICTION))  # too late: ignored
        served.answer = prediction
        assert (await served.client.post("/predict", json=BODY)).status_code == 200


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_request_timeout_header_is_400(value: str) -> None:
    @on_loop
    async def run() -> None:
        async with serving() as served:
            served.ready()
            headers = {"x-request-timeout": value}
            answer = await served.client.post("/predict", json=BODY, headers=headers)
            assert answer.status_code == 400
            assert "X-Request-Timeout must be a positive number" in answer.json()["error"]
            assert served.requests() == []

    run()


@on_loop
async def test_an_oversized_body_is_413_before_any_worker_sees_it() -> None:
    async with serving(max_body_mb=0.001) as served:  # 1048 bytes
        served.ready()
        answer = await served.client.post("/predict", content=b"[" + b"0," * 600 + b"0]")
        assert answer.status_code == 413
        assert answer.json() == {
            "error": "body of 1203 bytes exceeds the limit of 1048",
            "code": "payload_too_large",
        }
        assert served.requests() == []


@on_loop
async def test_an_empty_body_is_400() -> None:
    async with serving() as served:
        served.ready()
        answer = await served.client.post("/predict", content=b"")
        assert answer.status_code == 400
        assert answer.json()["code"] == "bad_request"
        assert "empty body" in answer.json()["error"]


@on_loop
async def test_get_on_predict_is_405_naming_post() -> None:
    async with serving() as served:
        answer = await served.client.get("/predict")
        assert answer.status_code == 405
        assert answer.headers["allow"] == "POST"
        assert answer.json() == {"error": "use POST for /predict", "code": "http_error"}


@on_loop
async def test_an_unknown_model_is_404_listing_the_served_ones() -> None:
    async with serving(model_name="resnet") as served:
        served.ready()
        answer = await served.client.post("/predict/bert", json=BODY)
        assert answer.status_code == 404
        assert answer.json() == {
            "error": "unknown model 'bert'; served: resnet",
            "code": "model_not_found",
            "models": ["resnet"],
        }
        assert (await served.client.post("/predict/resnet", json=BODY)).status_code == 200


@on_loop
async def test_an_api_key_guards_predict_with_a_bearer_challenge_but_not_the_probes() -> None:
    async with serving(api_key="first,second") as served:
        served.ready()
        for headers in ({}, {"authorization": "Bearer firs"}, {"authorization": "Basic first"}):
            answer = await served.client.post("/predict", json=BODY, headers=headers)
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == 'Bearer realm="torchpool"'
            assert answer.json()["code"] == "unauthorized"
        streamed = {"authorization": "Bearer nope", "accept": "text/event-stream"}
        answer = await served.client.post("/predict", json=BODY, headers=streamed)
        assert answer.status_code == 401
        assert (await served.client.post("/v2/models/demo/infer", json={})).status_code == 401
        assert served.requests() == []
        for key in ("first", "second"):
            headers = {"authorization": f"Bearer {key}"}
            assert (await served.client.post("/predict", json=BODY, headers=headers)).is_success
        for probe in ("/health", "/health/live", "/health/ready", "/v2/health/ready"):
            assert (await served.client.get(probe)).status_code == 200, probe


@on_loop
async def test_a_client_that_leaves_while_queued_is_dropped_from_the_queue() -> None:
    # Driven as raw ASGI: httpx's ASGITransport never reports a disconnect.
    async with serving() as served:
        served.ready(capacity=1)
        served.answer = None
        model = served.runtime.model()
        held = asyncio.ensure_future(served.client.post("/predict", json=BODY))
        await eventually(lambda: len(served.requests()) == 1, "the first request on the worker")

        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        messages.put_nowait({"type": "http.request", "body": orjson.dumps(BODY)})
        sent: list[AsgiMessage] = []

        async def send(message: AsgiMessage) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": PREDICT_PATH,
            "headers": [(b"content-type", b"application/json")],
        }
        leaving = asyncio.ensure_future(served.app(scope, messages.get, send))
        await eventually(lambda: model.dispatcher.queued == 1, "the second request queued")
        messages.put_nowait({"type": "http.disconnect"})
        await leaving
        assert model.dispatcher.queued == 0
        assert sent[0]["status"] == 499
        # It never reached the worker; the one that was there is still answered.
        [first] = served.requests()
        served.wire.deliver(first.identity, reply(first, PREDICTION))
        assert (await held).content == PREDICTION
        assert len(served.requests()) == 1


# --- /predict as Server-Sent Events ------------------------------------------------

EVENTS = {"accept": "text/event-stream"}


@on_loop
async def test_a_streaming_model_answers_events_then_end() -> None:
    async with serving() as served:
        served.ready(stream=True)
        served.answer = lambda sent: [
            chunk(sent, 0, {"token": "a"}),
            chunk(sent, 1, {"token": "b"}),
            end(sent),
        ]
        answer = await served.client.post("/predict", json=BODY, headers=EVENTS)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream"
        assert answer.headers["cache-control"] == "no-cache"
        assert answer.text == (
            'data: {"token":"a"}\n\ndata: {"token":"b"}\n\nevent: end\ndata: {}\n\n'
        )
        [sent] = served.requests()
        assert sent.header["stream"] is True and sent.header["credit"] == streams.CREDIT


@on_loop
async def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event() -> None:
    async with serving() as served:
        served.ready(stream=True)
        served.answer = lambda sent: [
            chunk(sent, 0, {"token": "a"}),
            error_reply(sent, "model_error", "the generator raised"),
        ]
        answer = await served.client.post("/predict", json=BODY, headers=EVENTS)
        assert answer.status_code == 200
        assert answer.text == (
            'data: {"token":"a"}\n\n'
            'event: error\ndata: {"error":"the generator raised","code":"model_error"}\n\n'
        )


@on_loop
async def test_an_error_before_any_event_is_an_ordinary_json_error() -> None:
    async with serving() as served:
        served.ready(stream=True)
        served.answer = lambda sent: [error_reply(sent, "shape_mismatch", "expected 16 columns")]
        answer = await served.client.post("/predict", json=BODY, headers=EVENTS)
        assert answer.status_code == 422
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"error": "expected 16 columns", "code": "shape_mismatch"}


@on_loop
async def test_a_model_that_does_not_stream_answers_events_requests_with_json() -> None:
    async with serving() as served:
        served.ready(stream=False)
        served.answer = prediction
        answer = await served.client.post("/predict", json=BODY, headers=EVENTS)
        assert answer.status_code == 200
        assert answer.content == PREDICTION
        assert "stream" not in served.requests()[0].header


# --- health and probes --------------------------------------------------------------


@on_loop
async def test_the_probes_follow_the_workers_and_the_drain() -> None:
    async with serving(workers=2, min_ready=2) as served:
        client = served.client
        assert (await client.get("/health/live")).json() == {"status": "alive"}
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert [w["state"] for w in health.json()["workers"]] == ["starting", "starting"]
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {
            "ready": False,
            "ready_workers": 0,
            "min_ready": 2,
            "reason": "0 workers ready, fewer than --min-ready 2",
        }

        served.ready()
        health = await client.get("/health")
        assert health.status_code == 200
        assert (health.json()["status"], health.json()["ready_workers"]) == ("ok", 2)
        assert (await client.get("/health/ready")).json() == {
            "ready": True,
            "ready_workers": 2,
            "min_ready": 2,
        }
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}

        served.runtime.begin_drain()
        draining = await client.get("/health/ready")
        assert draining.status_code == 503
        assert draining.json()["reason"] == "the server is shutting down"
        v2_draining = await client.get("/v2/health/ready")
        assert v2_draining.status_code == 503
        assert v2_draining.json() == {"error": "the server is shutting down", "ready": False}
        assert (await client.get("/health/live")).status_code == 200
        refused = await client.post("/predict", json=BODY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "the server is shutting down"
